"""Stage 1 losses against independent computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mosmos.models.losses import ClipLoss, TagLoss, class_balance_weights

torch.set_num_threads(2)


def reference_clip_loss(image, text, scale, extra_image=(), extra_text=()):
    """Symmetric InfoNCE by explicit loops in numpy (float64), extra negatives appended as columns."""
    image, text = np.asarray(image, np.float64), np.asarray(text, np.float64)
    text_bank = (
        np.concatenate([text, *[np.asarray(e, np.float64) for e in extra_text]]) if len(extra_text) else text
    )
    image_bank = (
        np.concatenate([image, *[np.asarray(e, np.float64) for e in extra_image]])
        if len(extra_image)
        else image
    )
    total = 0.0
    for i in range(len(image)):
        row = [scale * float(image[i] @ t) for t in text_bank]
        total += -(row[i] - math.log(sum(math.exp(r) for r in row)))
        col = [scale * float(text[i] @ v) for v in image_bank]
        total += -(col[i] - math.log(sum(math.exp(c) for c in col)))
    return total / (2 * len(image))


def embeddings(n, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n, d, generator=g), dim=-1),
        F.normalize(torch.randn(n, d, generator=g), dim=-1),
    )


def test_clip_loss_matches_loop_reference():
    image, text = embeddings(5)
    loss = ClipLoss()(image, text, torch.tensor(7.5))
    assert loss.item() == pytest.approx(reference_clip_loss(image, text, 7.5), rel=1e-5)


def test_clip_loss_perfect_alignment_is_small_and_gradients_reach_the_scale():
    image, _ = embeddings(4)
    scale = torch.tensor(math.log(50.0), requires_grad=True)
    loss = ClipLoss()(image, image.clone(), scale.exp())
    loss.backward()
    assert loss.item() < reference_clip_loss(*embeddings(4), 50.0)
    assert scale.grad is not None and scale.grad != 0


def test_clip_loss_queue_adds_past_embeddings_as_negatives():
    loss_fn = ClipLoss(queue_size=5, embed_dim=6)
    assert loss_fn.state_dict()["queue_image"].shape == (5, 6)
    batches = [embeddings(3, seed=s) for s in range(3)]
    first = loss_fn(*batches[0], torch.tensor(10.0))
    assert first.item() == pytest.approx(reference_clip_loss(*batches[0], 10.0), rel=1e-5)
    loss_fn(*batches[1], torch.tensor(10.0))
    # FIFO: the queue now holds the last 5 of the 6 embeddings seen (order does not change the loss).
    assert int(loss_fn.queue_count) == 5
    past_image = torch.cat([batches[0][0][1:], batches[1][0]])
    past_text = torch.cat([batches[0][1][1:], batches[1][1]])
    queued = {tuple(r) for r in loss_fn.queue_image.tolist()}
    assert queued == {tuple(r) for r in past_image.tolist()}

    loss = loss_fn(*batches[2], torch.tensor(10.0))
    want = reference_clip_loss(*batches[2], 10.0, extra_image=[past_image], extra_text=[past_text])
    assert loss.item() == pytest.approx(want, rel=1e-5)

    loss_fn.eval()
    before = loss_fn.queue_image.clone()
    loss_fn(*batches[0], torch.tensor(10.0))
    assert torch.equal(before, loss_fn.queue_image)  # validation does not enqueue
    loss_fn.reset_queue()
    assert int(loss_fn.queue_count) == 0
    assert loss_fn(*batches[2], torch.tensor(10.0)).item() == pytest.approx(
        reference_clip_loss(*batches[2], 10.0), rel=1e-5
    )


def test_clip_loss_lazy_queue_and_bad_shapes():
    loss_fn = ClipLoss(queue_size=4)
    image, text = embeddings(6)
    loss_fn(image, text, torch.tensor(5.0))  # a batch larger than the queue keeps its last rows
    assert torch.equal(loss_fn.queue_text, text[-4:])
    with pytest.raises(ValueError, match="image_emb"):
        loss_fn(image, text[:3], torch.tensor(5.0))
    with pytest.raises(ValueError, match="queue_size"):
        ClipLoss(queue_size=-1)


def test_lazy_queue_survives_a_checkpoint_round_trip():
    trained = ClipLoss(queue_size=4)
    trained(*embeddings(3), torch.tensor(5.0))
    resumed = ClipLoss(queue_size=4)
    resumed.load_state_dict(trained.state_dict())
    assert torch.equal(resumed.queue_image, trained.queue_image) and int(resumed.queue_count) == 3


def tag_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(4, 5, 2, generator=g)).requires_grad_()
    targets = torch.randint(-1, 2, (4, 5, 2), generator=g)
    return logits, targets


def test_bce_matches_torch_on_kept_entries_and_ignores_unknown():
    logits, targets = tag_data()
    keep = targets >= 0
    loss = TagLoss("bce")(logits, targets)
    want = F.binary_cross_entropy_with_logits(logits[keep], targets[keep].float())
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.all(logits.grad[~keep] == 0) and torch.all(logits.grad[keep] != 0)


def test_weighted_bce_matches_torch():
    logits, targets = tag_data(1)
    pos_w, neg_w = torch.rand(5, 2) + 0.5, torch.rand(5, 2) + 0.5
    keep = targets >= 0
    weight = torch.where(targets == 1, pos_w, neg_w)
    loss = TagLoss()(logits, targets, pos_weight=pos_w, neg_weight=neg_w)
    want = F.binary_cross_entropy_with_logits(logits[keep], targets[keep].float(), weight=weight[keep])
    torch.testing.assert_close(loss, want)


def test_asl_reduces_to_bce_and_matches_a_hand_computed_value():
    logits, targets = tag_data(2)
    plain = TagLoss("asl", gamma_neg=0.0, gamma_pos=0.0, clip=0.0)(logits, targets)
    torch.testing.assert_close(plain, TagLoss("bce")(logits, targets))

    asl = TagLoss("asl", gamma_neg=4.0, gamma_pos=1.0, clip=0.05)
    x = torch.tensor([[[0.0, math.log(3.0)]]])  # p = 0.5 and p = 0.75
    negative = asl(x, torch.tensor([[[0, -1]]]))
    assert negative.item() == pytest.approx(-(0.45**4) * math.log(0.55), rel=1e-5)
    positive = asl(x, torch.tensor([[[-1, 1]]]))
    assert positive.item() == pytest.approx(-(1 - 0.75) * math.log(0.75), rel=1e-5)
    # Far below the margin a negative costs nothing (and gets no gradient), instead of NaN.
    x = torch.tensor([[[-8.0]]], requires_grad=True)
    loss = TagLoss("asl", gamma_neg=0.5)(x, torch.tensor([[[0]]]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-5) and torch.isfinite(x.grad).all()


def test_asl_ignores_unknown_entries():
    logits, targets = tag_data(3)
    TagLoss("asl")(logits, targets).backward()
    assert torch.all(logits.grad[targets < 0] == 0)


def test_all_ignored_gives_zero_with_a_graph():
    logits, _ = tag_data()
    loss = TagLoss()(logits, -torch.ones(4, 5, 2, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.all(logits.grad == 0)


def test_class_balance_weights_known_counts():
    # class (0,0): 1 positive, 3 negatives, 1 unknown; class (1,0): no positive -> weights 1.
    targets = torch.tensor([[[1], [0]], [[0], [0]], [[0], [-1]], [[0], [0]], [[-1], [0]]])
    pos_w, neg_w = class_balance_weights(targets)
    assert pos_w.shape == neg_w.shape == (2, 1)
    assert pos_w[0, 0].item() == pytest.approx(2.0) and neg_w[0, 0].item() == pytest.approx(4 / 6)
    assert pos_w[0, 0] / neg_w[0, 0] == pytest.approx(3.0)  # n_neg / n_pos
    assert (1 * pos_w[0, 0] + 3 * neg_w[0, 0]).item() / 4 == pytest.approx(1.0)  # mean weight 1
    assert pos_w[1, 0] == 1 and neg_w[1, 0] == 1


def test_tag_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        TagLoss("focal")
    logits, targets = tag_data()
    with pytest.raises(ValueError, match="pos_weight"):
        TagLoss()(logits, targets, pos_weight=torch.ones(5))
