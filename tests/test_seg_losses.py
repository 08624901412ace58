"""Partially labelled segmentation losses against hand-computed values and numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mosmos.models.seg_losses import MarginalLoss, MaskedBCEDiceLoss, decode_prediction, organ_probabilities

torch.set_num_threads(2)

SMOOTH = 1e-5


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_masked(logits, target, labelled, smooth=SMOOTH, batch_dice=False):
    """BCE and Dice of MaskedBCEDiceLoss by explicit loops over samples and channels (float64)."""
    logits = np.asarray(logits, np.float64)
    target = np.asarray(target)
    b_size, c_size = logits.shape[:2]
    bce_terms, dice_terms = [], []
    pooled = {c: [0.0, 0.0, 0.0] for c in range(c_size)}
    for b in range(b_size):
        bce_sum, n_vox, dice_sum, n_lab = 0.0, 0, 0.0, 0
        for c in range(c_size):
            if not labelled[b][c]:
                continue
            x = logits[b, c].ravel()
            t = (target[b].ravel() == c + 1).astype(np.float64)
            p = np_sigmoid(x)
            bce_sum += float(np.sum(-(t * np.log(p) + (1 - t) * np.log(1 - p))))
            n_vox += x.size
            dice_sum += 1 - (2 * np.sum(p * t) + smooth) / (np.sum(p) + np.sum(t) + smooth)
            n_lab += 1
            pooled[c][0] += np.sum(p * t)
            pooled[c][1] += np.sum(p)
            pooled[c][2] += np.sum(t)
        bce_terms.append(bce_sum / n_vox if n_vox else 0.0)
        dice_terms.append(dice_sum / n_lab if n_lab else 0.0)
    bce = float(np.mean(bce_terms))
    if not batch_dice:
        return bce, float(np.mean(dice_terms))
    chans = [c for c in range(c_size) if any(labelled[b][c] for b in range(b_size))]
    if not chans:
        return bce, 0.0
    losses = [1 - (2 * pooled[c][0] + smooth) / (pooled[c][1] + pooled[c][2] + smooth) for c in chans]
    return bce, float(np.mean(losses))


def reference_marginal(logits, target, labelled, smooth=SMOOTH):
    """CE and Dice of MarginalLoss: softmax over [0, logits], unlabelled organs summed into background."""
    logits = np.asarray(logits, np.float64)
    target = np.asarray(target)
    b_size, c_size = logits.shape[:2]
    ce_terms, dice_terms = [], []
    for b in range(b_size):
        lab = [c for c in range(c_size) if labelled[b][c]]
        if not lab:
            ce_terms.append(0.0)
            dice_terms.append(0.0)
            continue
        z = logits[b].reshape(c_size, -1)
        full = np.concatenate([np.zeros((1, z.shape[1])), z])
        q = np.exp(full) / np.exp(full).sum(0, keepdims=True)
        t = target[b].ravel().copy()
        for c in range(c_size):
            if c not in lab:
                t[t == c + 1] = 0
        q_bg = q[0] + sum(q[c + 1] for c in range(c_size) if c not in lab)
        nll = [-math.log(q_bg[v]) if t[v] == 0 else -math.log(q[t[v], v]) for v in range(t.size)]
        ce_terms.append(float(np.mean(nll)))
        d = []
        for c in lab:
            p, tc = q[c + 1], (t == c + 1).astype(np.float64)
            d.append(1 - (2 * np.sum(p * tc) + smooth) / (np.sum(p) + np.sum(tc) + smooth))
        dice_terms.append(float(np.mean(d)))
    return float(np.mean(ce_terms)), float(np.mean(dice_terms))


def random_case(shape, num_organs, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], num_organs, *shape[1:], generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, num_organs + 1, (shape[0], 1, *shape[1:]), generator=g)
    return logits, target


# ----------------------------------------------------------------------------- masked BCE + Dice


def test_masked_hand_value():
    # All logits 0 -> p = 0.5 everywhere: BCE = ln 2 per voxel; one organ voxel out of four:
    # Dice loss = 1 - (2 * 0.5 + s) / (4 * 0.5 + 1 + s).
    logits = torch.zeros(1, 1, 2, 2, requires_grad=True)
    target = torch.tensor([[[[0, 1], [0, 0]]]])
    terms = MaskedBCEDiceLoss().components(logits, target, torch.ones(1, 1))
    assert terms["bce"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert terms["dice"].item() == pytest.approx(1 - (1 + SMOOTH) / (3 + SMOOTH), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(math.log(2) + 1 - (1 + SMOOTH) / (3 + SMOOTH), rel=1e-6)


def test_masked_chosen_values_1x2x2x2():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]], [[-2.0, 1.5], [3.0, 0.0]]]], dtype=torch.float64)
    target = torch.tensor([[[0, 1], [2, 1]]])  # [B, *S] form
    labelled = torch.tensor([[1.0, 1.0]])
    bce, dice = reference_masked(logits.numpy(), target.numpy(), [[1, 1]])
    loss_fn = MaskedBCEDiceLoss(bce_weight=0.7, dice_weight=1.3)
    terms = loss_fn.components(logits, target, labelled)
    assert terms["bce"].item() == pytest.approx(bce, rel=1e-10)
    assert terms["dice"].item() == pytest.approx(dice, rel=1e-10)
    assert loss_fn(logits, target.unsqueeze(1), labelled).item() == pytest.approx(0.7 * bce + 1.3 * dice)


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_masked_matches_reference(shape, batch_dice):
    logits, target = random_case(shape, num_organs=3, seed=1)
    labelled = [[1, 0, 1], [0, 1, 0], [1, 1, 1]][: shape[0]]
    terms = MaskedBCEDiceLoss(batch_dice=batch_dice).components(logits, target, torch.tensor(labelled).bool())
    bce, dice = reference_masked(logits.numpy(), target[:, 0].numpy(), labelled, batch_dice=batch_dice)
    assert terms["bce"].item() == pytest.approx(bce, rel=1e-10)
    assert terms["dice"].item() == pytest.approx(dice, rel=1e-10)


def test_masked_batch_dice_hand_value():
    # Two samples, one organ, logits 0 (p = 0.5). Sample 0 has 1 organ voxel of 4, sample 1 has 3.
    # Pooled: sum pt = 0.5 * 4, sum p = 4, sum t = 4 -> loss = 1 - (4 + s) / (8 + s).
    logits = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[0, 1], [0, 0]], [[1, 1], [1, 0]]])
    dice = MaskedBCEDiceLoss(batch_dice=True).components(logits, target, torch.ones(2, 1))["dice"]
    assert dice.item() == pytest.approx(1 - (4 + SMOOTH) / (8 + SMOOTH), rel=1e-6)
    per_sample = MaskedBCEDiceLoss().components(logits, target, torch.ones(2, 1))["dice"]
    expected = ((1 - (1 + SMOOTH) / (3 + SMOOTH)) + (1 - (3 + SMOOTH) / (5 + SMOOTH))) / 2
    assert per_sample.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_masked_unlabelled_channel_gets_exactly_zero_gradient(batch_dice):
    logits, target = random_case((2, 4, 4, 3), num_organs=3, seed=2)
    logits = logits.float()
    with torch.no_grad():
        logits[0, 1] = float("nan")  # unlabelled entries may hold anything
        logits[1, 2] = float("inf")
    logits.requires_grad_(True)
    labelled = torch.tensor([[True, False, True], [True, True, False]])
    loss = MaskedBCEDiceLoss(batch_dice=batch_dice)(logits, target, labelled)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.equal(logits.grad[0, 1], torch.zeros_like(logits.grad[0, 1]))
    assert torch.equal(logits.grad[1, 2], torch.zeros_like(logits.grad[1, 2]))
    assert logits.grad[0, 0].abs().sum() > 0 and logits.grad[1, 1].abs().sum() > 0
    # Same value as with the unlabelled entries cleaned up.
    clean = logits.detach().clone()
    clean[0, 1] = 0.0
    clean[1, 2] = 0.0
    assert loss.item() == pytest.approx(
        MaskedBCEDiceLoss(batch_dice=batch_dice)(clean, target, labelled).item()
    )


def test_masked_sample_without_labels_adds_zero():
    logits, target = random_case((2, 3, 3), num_organs=2, seed=3)
    labelled = torch.tensor([[True, True], [False, False]])
    full = MaskedBCEDiceLoss()(logits, target, labelled)
    alone = MaskedBCEDiceLoss()(logits[:1], target[:1], labelled[:1])
    assert full.item() == pytest.approx(alone.item() / 2, rel=1e-10)  # mean over B = 2


@pytest.mark.parametrize("loss_fn", [MaskedBCEDiceLoss(), MaskedBCEDiceLoss(batch_dice=True), MarginalLoss()])
def test_nothing_labelled_gives_connected_zero(loss_fn):
    logits, target = random_case((2, 3, 3, 2), num_organs=2, seed=4)
    logits.requires_grad_(True)
    loss = loss_fn(logits, target, torch.zeros(2, 2))
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_input_validation():
    logits = torch.zeros(1, 2, 3, 3)
    with pytest.raises(ValueError, match="target values"):
        MaskedBCEDiceLoss()(logits, torch.full((1, 3, 3), 3), torch.ones(1, 2))
    with pytest.raises(ValueError, match="labelled"):
        MaskedBCEDiceLoss()(logits, torch.zeros(1, 3, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="does not match"):
        MarginalLoss()(logits, torch.zeros(1, 3, 4), torch.ones(1, 2))


# ----------------------------------------------------------------------------- marginal loss


def test_marginal_hand_value():
    # Logits 0 -> q = 1/3 for background and both organs. Organ 2 (channel 1) is unlabelled, so the
    # merged background has 2/3. The voxel labelled 2 in the target counts as background.
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[0, 1], [2, 0]]])
    terms = MarginalLoss().components(logits, target, torch.tensor([[True, False]]))
    ce = (3 * -math.log(2 / 3) - math.log(1 / 3)) / 4
    dice = 1 - (2 / 3 + SMOOTH) / (4 / 3 + 1 + SMOOTH)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["dice"].item() == pytest.approx(dice, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(ce + dice, rel=1e-6)


@pytest.mark.parametrize("shape", [(3, 4, 5), (3, 3, 4, 2)], ids=["2d", "3d"])
def test_marginal_matches_reference(shape):
    logits, target = random_case(shape, num_organs=4, seed=5)
    labelled = [[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]]
    terms = MarginalLoss(dice_weight=0.5).components(logits, target, torch.tensor(labelled))
    ce, dice = reference_marginal(logits.numpy(), target[:, 0].numpy(), labelled)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert terms["dice"].item() == pytest.approx(dice, rel=1e-10)
    assert terms["loss"].item() == pytest.approx(ce + 0.5 * dice, rel=1e-10)


def test_marginal_depends_on_unlabelled_organs_only_through_merged_background():
    # Channels 1 and 2 are unlabelled: any change keeping exp(z1) + exp(z2) fixed leaves the loss alone.
    logits, target = random_case((1, 4, 4), num_organs=3, seed=6)
    labelled = torch.tensor([[True, False, False]])
    target = torch.where(target > 1, torch.zeros_like(target), target)
    moved = logits.clone()
    total = logits[:, 1].exp() + logits[:, 2].exp()
    moved[:, 1] = torch.log(0.1 * total)
    moved[:, 2] = torch.log(0.9 * total)
    assert MarginalLoss()(moved, target, labelled).item() == pytest.approx(
        MarginalLoss()(logits, target, labelled).item(), rel=1e-12
    )


def test_marginal_unlabelled_sample_gets_exactly_zero_gradient():
    logits, target = random_case((2, 4, 4, 2), num_organs=3, seed=7)
    logits = logits.float()
    with torch.no_grad():
        logits[1] = float("nan")
    logits.requires_grad_(True)
    labelled = torch.tensor([[True, False, True], [False, False, False]])
    loss = MarginalLoss(batch_dice=True)(logits, target, labelled)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.equal(logits.grad[1], torch.zeros_like(logits.grad[1]))
    # Unlabelled organs of a labelled sample do get gradient (they share the softmax).
    assert logits.grad[0, 1].abs().sum() > 0


def test_marginal_gradient_matches_finite_differences():
    logits, target = random_case((2, 3, 2), num_organs=3, seed=8)
    labelled = torch.tensor([[True, False, True], [False, True, False]])
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: MarginalLoss()(x, target, labelled), (logits,))
    assert torch.autograd.gradcheck(lambda x: MaskedBCEDiceLoss()(x, target, labelled), (logits,))


def test_half_precision_logits_are_upcast():
    logits, target = random_case((2, 3, 3), num_organs=2, seed=9)
    labelled = torch.ones(2, 2)
    for loss_fn in (MaskedBCEDiceLoss(), MarginalLoss()):
        low = loss_fn(logits.to(torch.bfloat16), target, labelled)
        assert low.dtype == torch.float32
        ref = loss_fn(logits.to(torch.bfloat16).double(), target, labelled)
        assert low.item() == pytest.approx(ref.item(), rel=1e-5)


# ----------------------------------------------------------------------------- decoding


def test_decode_masked_and_marginal():
    # Voxels: (a) both organs low, (b) organ 1 highest, (c) organ 2 highest, (d) 0.6 vs 0.55.
    logits = torch.tensor([[[-3.0, 2.0, 0.5, math.log(0.6 / 0.4)], [-1.0, 1.0, 4.0, math.log(0.55 / 0.45)]]])
    logits = logits.view(1, 2, 2, 2)
    masked = decode_prediction(logits, "masked")
    assert masked.dtype == torch.long and masked.shape == (1, 2, 2)
    assert masked.flatten().tolist() == [0, 1, 2, 1]
    assert decode_prediction(logits, "masked", threshold=0.7).flatten().tolist() == [0, 1, 2, 0]
    # Marginal: argmax over [0, z1, z2]; (a) background, (d) both positive -> organ 1.
    assert decode_prediction(logits, "marginal").flatten().tolist() == [0, 1, 2, 1]
    assert decode_prediction(torch.tensor([[[-0.5]], [[-0.1]]]).view(1, 2, 1, 1), "marginal").item() == 0


def test_decode_3d_shape_and_probabilities():
    logits, _ = random_case((2, 3, 4, 5), num_organs=3, seed=10)
    for strategy in ("masked", "marginal"):
        assert decode_prediction(logits, strategy).shape == (2, 3, 4, 5)
        assert organ_probabilities(logits, strategy).shape == logits.shape
    np.testing.assert_allclose(organ_probabilities(logits, "masked").numpy(), np_sigmoid(logits.numpy()))
    z = logits.numpy()
    denom = 1 + np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(organ_probabilities(logits, "marginal").numpy(), np.exp(z) / denom, rtol=1e-12)
    # The marginal argmax agrees with the probabilities (background = 1 - sum of organs).
    probs = organ_probabilities(logits, "marginal")
    full = torch.cat([1 - probs.sum(1, keepdim=True), probs], dim=1)
    assert torch.equal(full.argmax(1), decode_prediction(logits, "marginal"))
    with pytest.raises(ValueError, match="strategy"):
        decode_prediction(logits, "softmax")
