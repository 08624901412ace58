"""The stage 1 objective: named losses, weights, and which parts each term trains."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mosmos.models.losses import TagLoss
from mosmos.models.pretrain_model import MosmosPretrainModel
from mosmos.models.registry import create_image_encoder
from mosmos.models.tag_head import TagHeadConfig
from mosmos.models.text import TextEncoder, build_small_bert
from mosmos.pretrain.objective import PretrainObjective


def _model(text=True):
    torch.manual_seed(0)
    enc = create_image_encoder(
        "rescnn3d", channels=(4, 8, 8, 8), strides=(2, 2, 2, 2), num_res_units=1, norm="batch"
    )
    txt = (
        TextEncoder(build_small_bert(50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32))
        if text
        else None
    )
    return MosmosPretrainModel(enc, txt, embed_dim=8, num_tags=3, tag_head_config=TagHeadConfig(dim=8))


def _batch(b=4):
    g = torch.Generator().manual_seed(1)
    tags = torch.randint(-1, 2, (b, 3, 2), generator=g).to(torch.int8)
    return {
        "image": torch.rand(b, 1, 16, 16, 16, generator=g),
        "body_mask": torch.ones(b, 1, 16, 16, 16, dtype=torch.bool),
        "input_ids": torch.randint(5, 50, (b, 7), generator=g),
        "attention_mask": torch.ones(b, 7, dtype=torch.long),
        "report": [f"report {i}" for i in range(b)],
        "tags": tags,
    }


def test_total_is_the_weighted_sum_and_text_learns_from_tags():
    objective = PretrainObjective(
        _model(), contrastive_weight=0.7, tag_weight=2.0, embedding_tag_weight=0.5, embed_dim=8, num_tags=3
    )
    losses = objective(_batch())
    want = 0.7 * losses["contrastive"] + 2.0 * losses["tags"] + 0.5 * losses["embedding_tags"]
    torch.testing.assert_close(losses["loss"], want)
    # the embedding tag term alone reaches the text encoder (it reads the report embedding)
    objective.zero_grad()
    losses["embedding_tags"].backward()
    grads = [p.grad for p in objective.model.text_encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_embedding_tags_match_an_independent_computation():
    objective = PretrainObjective(
        _model(), contrastive_weight=1.0, tag_weight=1.0, embedding_tag_weight=1.0, embed_dim=8, num_tags=3
    )
    objective.eval()
    batch = _batch()
    losses = objective(batch)
    out = objective.model(batch["image"], batch["body_mask"], batch["input_ids"], batch["attention_mask"])
    head = objective.embedding_tag_head
    loss = TagLoss()
    scale = 8**0.5  # unit embeddings are rescaled by sqrt(dim) before the head
    want = 0.5 * (
        loss(head(out["image_emb"] * scale).view(4, 3, 2), batch["tags"])
        + loss(head(out["text_emb"] * scale).view(4, 3, 2), batch["tags"])
    )
    torch.testing.assert_close(losses["embedding_tags"], want)


def test_tags_only_ablation_has_no_contrastive_term():
    objective = PretrainObjective(
        _model(text=False),
        contrastive_weight=0.0,
        tag_weight=1.0,
        embedding_tag_weight=0.5,
        embed_dim=8,
        num_tags=3,
    )
    losses = objective(_batch())
    assert "contrastive" not in losses and set(losses) == {"tags", "embedding_tags", "loss"}
    losses["loss"].backward()
    # every image-encoder level is trained (the pooled embedding feeds the embedding tag head)
    assert all(p.grad is not None for p in objective.model.image_encoder.parameters())


class _FixedOutputs(nn.Module):
    """A stand-in pretraining model whose outputs are parameters set by the test, so the objective's
    value and gradients have closed forms."""

    def __init__(self, image_emb, text_emb, tag_logits, logit_scale):
        super().__init__()
        self.image_emb = nn.Parameter(image_emb)
        self.text_emb = nn.Parameter(text_emb)
        self.tag_logits = nn.Parameter(tag_logits)
        self.scale = logit_scale

    def forward(self, image, mask=None, input_ids=None, attention_mask=None, text_cache_keys=None):
        out = {"image_emb": self.image_emb, "pooled": self.image_emb, "tag_logits": self.tag_logits}
        if input_ids is not None:
            out["text_emb"] = self.text_emb
            out["logit_scale"] = torch.tensor(self.scale)
        return out


def _bce_by_hand(logits, targets, pos_weight=None, neg_weight=None):
    """Mean over the known entries (target 0 or 1) of the (weighted) binary cross-entropy."""
    total, count = 0.0, 0
    for idx in itertools.product(*(range(n) for n in logits.shape)):
        y = int(targets[idx])
        if y < 0:
            continue
        p = 1.0 / (1.0 + math.exp(-float(logits[idx])))
        weight = pos_weight if y == 1 else neg_weight
        w = 1.0 if weight is None else float(weight[idx[1:]])
        total += -w * math.log(p if y == 1 else 1.0 - p)
        count += 1
    return total / count


def test_known_answer_value_and_gradients():
    """Aligned one-hot embeddings with inverse temperature s: every row's cross-entropy is
    log(1 + (B - 1) e^-s); the gradient of each embedding is s / B (softmax - one-hot) @ the other side;
    tag logits get w (sigmoid(x) - y) / n_known, and exactly zero where the tag is unknown."""
    b, s, wc, wt = 3, 2.0, 0.7, 1.5
    emb = torch.eye(b, 4)  # unit rows, one per pair
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0]], [[-0.3, 1.2], [0.0, 0.8]], [[1.0, -2.0], [0.4, 0.1]]])
    tags = torch.tensor([[[1, 0], [-1, 1]], [[0, -1], [1, 1]], [[-1, -1], [0, 1]]], dtype=torch.int8)
    model = _FixedOutputs(emb.clone(), emb.clone(), logits.clone(), s)
    objective = PretrainObjective(model, contrastive_weight=wc, tag_weight=wt)
    losses = objective({**_batch(b), "tags": tags})

    contrastive = math.log(1 + (b - 1) * math.exp(-s))
    tag = _bce_by_hand(logits, tags)
    assert losses["contrastive"].item() == pytest.approx(contrastive, rel=1e-6)
    assert losses["tags"].item() == pytest.approx(tag, rel=1e-6)
    assert losses["loss"].item() == pytest.approx(wc * contrastive + wt * tag, rel=1e-6)

    losses["loss"].backward()
    p, q = math.exp(s) / (math.exp(s) + b - 1), 1 / (math.exp(s) + b - 1)
    softmax_minus_onehot = torch.full((b, b), q) + torch.eye(b) * (p - q - 1)
    want = torch.zeros(b, 4)
    want[:, :b] = wc * s / b * softmax_minus_onehot
    torch.testing.assert_close(model.image_emb.grad, want)
    torch.testing.assert_close(model.text_emb.grad, want)
    known = tags >= 0
    want_tags = wt * (torch.sigmoid(logits) - tags.clamp_min(0).float()) / known.sum()
    torch.testing.assert_close(model.tag_logits.grad, torch.where(known, want_tags, 0.0))
    assert (model.tag_logits.grad[~known] == 0).all()


def test_swapped_pairs_cost_more_than_matched_ones():
    """Each image paired with the next image's report: the right report scores 0, a wrong one s, so
    each row's cross-entropy is log(e^s + B - 1)."""
    b, s = 3, 2.0
    emb = torch.eye(b, 4)
    model = _FixedOutputs(emb, emb.roll(1, dims=0), torch.zeros(b, 2, 2), s)
    objective = PretrainObjective(model, contrastive_weight=1.0, tag_weight=0.0)
    losses = objective(_batch(b))
    assert set(losses) == {"contrastive", "loss"}
    assert losses["loss"].item() == pytest.approx(math.log(math.exp(s) + b - 1), rel=1e-6)


def test_real_model_terms_match_an_independent_computation():
    """On the real model's outputs: symmetric InfoNCE via cross-entropy over the batch, and the
    class-weighted BCE over the known tags only, combined with the configured weights."""
    g = torch.Generator().manual_seed(2)
    pos_weight, neg_weight = torch.rand(3, 2, generator=g) + 0.5, torch.rand(3, 2, generator=g) + 0.5
    objective = PretrainObjective(
        _model(), contrastive_weight=0.3, tag_weight=2.5, pos_weight=pos_weight, neg_weight=neg_weight
    ).eval()  # eval: batch norm and dropout give the same outputs on the second forward below
    batch = _batch()
    losses = objective(batch)
    with torch.no_grad():
        out = objective.model(batch["image"], batch["body_mask"], batch["input_ids"], batch["attention_mask"])
    logits = out["logit_scale"] * out["image_emb"] @ out["text_emb"].T
    labels = torch.arange(4)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(losses["contrastive"].detach(), want)
    tags = _bce_by_hand(out["tag_logits"], batch["tags"], pos_weight, neg_weight)
    assert losses["tags"].item() == pytest.approx(tags, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(0.3 * want.item() + 2.5 * tags, rel=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0)])
def test_each_ablation_trains_only_its_parts(weights):
    c, t = weights
    objective = PretrainObjective(_model(text=c > 0), contrastive_weight=c, tag_weight=t)
    losses = objective(_batch())
    assert set(losses) == ({"contrastive"} if c else {"tags"}) | {"loss"}
    torch.testing.assert_close(losses["loss"], losses["contrastive" if c else "tags"])
    losses["loss"].backward()
    # the tag head is trained by the tag term only (it does not feed the contrastive embedding here)
    head = [p.grad for p in objective.model.tag_head.parameters()]
    if t:
        assert any(g is not None and g.abs().sum() > 0 for g in head)
    else:
        assert all(g is None or (g == 0).all() for g in head)
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in objective.model.image_encoder.parameters()
    )


def test_unknown_tags_give_the_tag_head_exactly_zero_gradient():
    objective = PretrainObjective(_model(text=False), contrastive_weight=0.0, tag_weight=1.0)
    losses = objective({**_batch(), "tags": torch.full((4, 3, 2), -1, dtype=torch.int8)})
    assert losses["loss"].item() == 0.0
    losses["loss"].backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in objective.parameters())


def test_pooled_tag_head_is_a_jointly_trained_linear_probe():
    objective = PretrainObjective(
        _model(),
        contrastive_weight=1.0,
        tag_weight=1.0,
        embed_dim=8,
        num_tags=3,
        pooled_tag_weight=2.0,
        pooled_dim=8,
    )
    batch = _batch()
    losses = objective(batch)
    out = objective.model(batch["image"], batch["body_mask"], batch["input_ids"], batch["attention_mask"])
    want = TagLoss()(objective.pooled_tag_head(out["pooled"]).view(4, 3, 2), batch["tags"])
    torch.testing.assert_close(losses["pooled_tags"], want)
    torch.testing.assert_close(
        losses["loss"], losses["contrastive"] + losses["tags"] + 2.0 * losses["pooled_tags"]
    )


def test_text_lr_scale_prefix_names_the_text_tower():
    """train.text_lr_scale reaches exactly the text encoder's parameters through the engine's groups."""
    from mosmos.engine.schedule import parameter_groups
    from mosmos.pretrain.train import TEXT_PARAMETERS

    objective = PretrainObjective(_model(), contrastive_weight=1.0, tag_weight=1.0)
    groups = parameter_groups(objective, 0.01, {TEXT_PARAMETERS: 0.1})
    scaled = {id(p) for g in groups if g["lr_scale"] == 0.1 for p in g["params"]}
    text = {id(p) for p in objective.model.text_encoder.parameters()}
    assert scaled == text and len(text) > 0
