"""The stage 1 objective: named losses, weights, and which parts each term trains."""

from __future__ import annotations

import pytest
import torch

from mosmos.models.losses import TagLoss
from mosmos.models.pretrain_model import MosmosPretrainModel
from mosmos.models.registry import create_image_encoder
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
    return MosmosPretrainModel(enc, txt, embed_dim=8, num_tags=3, tag_dim=8, fuse_levels=False)


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


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0)])
def test_each_ablation_runs(weights):
    c, t = weights
    objective = PretrainObjective(
        _model(text=c > 0), contrastive_weight=c, tag_weight=t, embed_dim=8, num_tags=3
    )
    losses = objective(_batch())
    assert torch.isfinite(losses["loss"])


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
    from mosmos.engine import parameter_groups
    from mosmos.pretrain.train import TEXT_PARAMETERS

    objective = PretrainObjective(_model(), contrastive_weight=1.0, tag_weight=1.0)
    groups = parameter_groups(objective, 0.01, {TEXT_PARAMETERS: 0.1})
    scaled = {id(p) for g in groups if g["lr_scale"] == 0.1 for p in g["params"]}
    text = {id(p) for p in objective.model.text_encoder.parameters()}
    assert scaled == text and len(text) > 0
