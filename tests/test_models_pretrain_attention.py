"""Pixel-tag attention and the stage 1 tag head: masking, location prior, level fusion, the head's
settings and its export record (including the flat records of heads exported before the pruning)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mosmos.models import PixelTagAttention, TagAttentionHead, TagHeadConfig
from mosmos.models.attention import POSITION_PRIOR_GAIN

torch.set_num_threads(2)


def test_attention_sums_to_one_inside_the_mask_and_is_zero_outside():
    torch.manual_seed(0)
    pta = PixelTagAttention(feature_dim=8, num_tags=5, dim=16, num_heads=2)
    features = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    mask = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)  # input resolution: 2x the map
    mask[0, :, :4] = True
    mask[1, :, 2:6, 2:6, 2:6] = True
    logits, attn = pta(features, mask)
    assert logits.shape == (2, 5, 2) and attn.shape == (2, 5, 4, 4, 4)
    torch.testing.assert_close(attn.flatten(2).sum(-1), torch.ones(2, 5))
    inside = F.adaptive_max_pool3d(mask.float(), (4, 4, 4)) > 0
    assert torch.all(attn.masked_select(~inside) == 0)
    assert torch.all(attn.masked_select(inside) > 0)

    (logits.sum() + (attn * torch.randn_like(attn)).sum()).backward()
    assert pta.queries.grad.abs().sum() > 0 and features.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pta.parameters())


def test_attention_can_be_kept_off_cells_on_the_bodys_outline():
    """min_inside=1: only cells wholly inside the body are attended; a body too small for any such
    cell falls back to the any-voxel rule."""
    torch.manual_seed(0)
    pta = PixelTagAttention(feature_dim=8, num_tags=3, dim=16, min_inside=1.0)
    features = torch.randn(2, 8, 4, 4, 4)
    mask = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
    mask[0, :, 1:7, 1:7, 1:7] = True  # cells 1..2 wholly inside; the outer ring is half inside
    mask[1, :, 3:5, 3:5, 3:5] = True  # straddles 8 cells, fills none
    _, attn = pta(features, mask)
    full = torch.zeros(4, 4, 4, dtype=torch.bool)
    full[1:3, 1:3, 1:3] = True
    assert torch.all(attn[0][:, ~full] == 0) and torch.all(attn[0][:, full] > 0)
    touched = F.adaptive_max_pool3d(mask[1:].float(), (4, 4, 4))[0, 0] > 0
    assert touched.sum() == 8 and torch.all(attn[1][:, touched] > 0) and torch.all(attn[1][:, ~touched] == 0)
    with pytest.raises(ValueError, match="min_inside"):
        PixelTagAttention(feature_dim=8, num_tags=3, min_inside=1.5)


def test_attention_margin_keeps_the_maps_edge_out_of_reach():
    torch.manual_seed(0)
    features = torch.randn(1, 8, 6, 6, 6)
    mask = torch.ones(1, 1, 6, 6, 6, dtype=torch.bool)
    _, attn = PixelTagAttention(feature_dim=8, num_tags=2, dim=16, margin=1)(features, mask)
    core = torch.zeros(6, 6, 6, dtype=torch.bool)
    core[1:5, 1:5, 1:5] = True
    assert torch.all(attn[0][:, ~core] == 0) and torch.all(attn[0][:, core] > 0)
    torch.testing.assert_close(attn.flatten(2).sum(-1), torch.ones(1, 2))


def test_attention_matches_scaled_dot_product_attention():
    torch.manual_seed(0)
    pta = PixelTagAttention(feature_dim=6, num_tags=3, dim=8)
    features = torch.randn(2, 6, 3, 4, 2)
    mask = torch.rand(2, 1, 3, 4, 2) > 0.4
    logits, attn = pta(features, mask)

    tokens = pta.feature_norm(pta.embed(features).flatten(2).transpose(1, 2))
    q = pta.to_q(pta.query_norm(pta.queries)).expand(2, -1, -1)
    k, v = pta.to_k(tokens), pta.to_v(tokens)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.flatten(2))
    pooled = pta.out_norm(attended)
    want = torch.stack([pooled[:, t] @ pta.head_weight[t] + pta.head_bias[t] for t in range(3)], 1)
    torch.testing.assert_close(logits, want)
    weights = torch.softmax(
        (q @ k.transpose(1, 2) / math.sqrt(8)).masked_fill(~mask.flatten(2), -math.inf), -1
    )
    torch.testing.assert_close(attn.flatten(2), weights)


def test_all_masked_input_stays_finite():
    pta = PixelTagAttention(feature_dim=4, num_tags=2, dim=8)
    features = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    logits, attn = pta(features, torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool))
    assert torch.isfinite(logits).all() and torch.all(attn == 0)
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in pta.parameters() if p.grad is not None)
    assert torch.isfinite(features.grad).all()


def test_position_prior_moves_the_peak():
    """With features that carry no location, the attention is the softmax of the gain-scaled,
    upsampled prior itself."""
    torch.manual_seed(0)
    pta = PixelTagAttention(feature_dim=4, num_tags=2, dim=8, position_prior=(2, 2, 2))
    assert torch.all(pta.position_logits == 0)  # flat at the start
    with torch.no_grad():
        pta.position_logits[0, 1, 0, 1] = 0.3  # tag 0 prefers the +x, -y, +z octant
        pta.position_logits[1, 0, 1, 0] = 0.3
    features = torch.randn(1, 4, 1, 1, 1).expand(1, 4, 4, 4, 4)  # the same feature everywhere
    _, attn = pta(features)
    prior = F.interpolate(pta.position_logits.detach()[None], size=(4, 4, 4), mode="trilinear")[0]
    torch.testing.assert_close(
        attn[0].flatten(1), torch.softmax(POSITION_PRIOR_GAIN * prior.flatten(1), dim=1)
    )
    assert tuple(torch.nonzero(attn[0, 0] == attn[0, 0].max())[0]) == (3, 0, 3)
    assert tuple(torch.nonzero(attn[0, 1] == attn[0, 1].max())[0]) == (0, 3, 0)
    with pytest.raises(ValueError, match="position_prior"):
        PixelTagAttention(feature_dim=4, num_tags=2, position_prior=(2, 2))


def test_position_prior_offsets_the_content_scores_by_the_gain():
    """A trained (here: random) prior multiplies each cell's attention by exp(gain * prior there),
    renormalised over the cells inside the mask; turning it off gives the content attention back."""
    torch.manual_seed(0)
    pta = PixelTagAttention(feature_dim=4, num_tags=3, dim=8, position_prior=(4, 4, 2))
    features, mask = torch.randn(2, 4, 4, 4, 2), torch.rand(2, 1, 4, 4, 2) > 0.3
    with torch.no_grad():
        pta.position_logits.normal_(std=0.2)
        _, with_prior = pta(features, mask)
        pta.use_position_prior = False
        _, content = pta(features, mask)
    # same grid as the map: the upsampling is the identity, so the offsets are the logits themselves
    shifted = content * torch.exp(POSITION_PRIOR_GAIN * pta.position_logits.detach())[None]
    want = shifted / shifted.flatten(2).sum(-1)[..., None, None, None]
    scale = want.abs().max().item()
    torch.testing.assert_close(with_prior, want, atol=1e-5 * scale, rtol=1e-4)
    assert (with_prior - content).abs().max() > 0.1 * scale


def test_position_prior_gradient_matches_finite_differences():
    """The tag losses reach the prior: its gradient (gain included) equals the loss's central
    difference along one coarse cell (float64)."""
    torch.manual_seed(0)
    pta = PixelTagAttention(feature_dim=4, num_tags=2, dim=8, position_prior=(2, 2, 2)).double()
    features, weights = torch.randn(1, 4, 4, 4, 4).double(), torch.randn(1, 2, 2).double()
    weights[:, 0] = 0  # only tag 1's logits count

    def loss() -> torch.Tensor:
        return (pta(features)[0] * weights).sum()

    loss().backward()
    grad = pta.position_logits.grad[1, 0, 1, 1].item()
    eps = 1e-4
    with torch.no_grad():
        pta.position_logits[1, 0, 1, 1] += eps
        up = loss().item()
        pta.position_logits[1, 0, 1, 1] -= 2 * eps
        down = loss().item()
    assert abs(grad) > 1e-3
    assert grad == pytest.approx((up - down) / (2 * eps), rel=1e-5)
    assert torch.all(pta.position_logits.grad[0] == 0)  # each tag has its own prior


def test_query_init_and_per_tag_heads():
    init = torch.randn(3, 10)
    pta = PixelTagAttention(feature_dim=4, num_tags=3, dim=8, query_init=init)
    assert pta.queries.shape == (3, 8)
    # The projection is linear: the queries keep the names' similarity structure up to a linear map.
    assert torch.linalg.matrix_rank(torch.cat([init - init.mean(0), pta.queries.detach()], 1)) == 2
    features = torch.randn(1, 4, 2, 2, 2)
    before, _ = pta(features)
    with torch.no_grad():
        pta.head_weight[1] += 1.0
    after, _ = pta(features)
    changed = (after - before).abs().sum(-1)[0]
    assert changed[1] > 0 and changed[0] == 0 and changed[2] == 0
    with pytest.raises(ValueError, match="query_init"):
        PixelTagAttention(feature_dim=4, num_tags=3, query_init=torch.randn(4, 10))


# ---------------------------------------------------------------- the tag head


def test_head_config_defaults_are_the_tuned_method_and_levels_resolve():
    cfg = TagHeadConfig()
    assert (cfg.position_prior, cfg.min_inside, cfg.margin, cfg.level) == ([8, 8, 4], 1.0, 1, None)
    assert cfg.resolve([1, 2, 4, 8]).level == 2  # the coarsest level with stride <= 4
    assert cfg.resolve([2, 4, 8, 16]).level == 1
    assert TagHeadConfig(level=-1).resolve([1, 2, 4]).level == 2
    with pytest.raises(ValueError, match="stride <= 4"):
        cfg.resolve([8, 16])
    with pytest.raises(ValueError, match="level=3"):
        TagHeadConfig(level=3).resolve([1, 2, 4])
    with pytest.raises(ValueError, match="resolve"):
        TagAttentionHead([4, 6], num_tags=2, config=TagHeadConfig())  # level not resolved
    for bad, match in [({"dim": 0}, "dim"), ({"min_inside": 2.0}, "min_inside"), ({"margin": -1}, "margin")]:
        with pytest.raises(ValueError, match=match):
            TagHeadConfig(**bad).check()


def test_level0_values_are_averaged_onto_the_attention_grid():
    """A one-voxel spike in the finest level reaches its attention cell averaged over the cell's 8
    voxels, and no other cell."""
    head = TagAttentionHead([2, 3, 5], num_tags=1, config=TagHeadConfig(dim=4, level=1))
    fine = torch.zeros(1, 2, 4, 4, 4)
    fine[0, 0, 1, 0, 1] = 8.0  # in cell (0, 0, 0) of the 2x2x2 attention grid
    seen = {}

    def spy(keys, mask=None, values=None):
        seen["values"] = values
        return torch.zeros(1, 1, 2), torch.zeros(1, 1, *keys.shape[2:])

    head.pixel_tag.forward = spy
    head([fine, torch.randn(1, 3, 2, 2, 2), torch.randn(1, 5, 1, 1, 1)])
    values = seen["values"]
    assert values.shape == (1, 2, 2, 2, 2)
    assert values[0, 0, 0, 0, 0].item() == pytest.approx(1.0)
    assert values.abs().sum().item() == pytest.approx(1.0)


def test_deepest_level_has_nothing_to_fuse():
    head = TagAttentionHead([2, 3], num_tags=2, config=TagHeadConfig(dim=4, level=1, position_prior=None))
    assert head.fusion is None and head.pixel_tag.value_embed is None
    logits, attn = head([torch.randn(1, 2, 4, 4, 4), torch.randn(1, 3, 2, 2, 2)])
    assert logits.shape == (1, 2, 2) and attn.shape == (1, 2, 2, 2, 2)


def _flat_record(**changes) -> dict:
    """The record a head of the previous version wrote (``TagAttentionHead(**record)``)."""
    record = {
        "feature_channels": [4, 6, 8],
        "num_tags": 2,
        "attn_level": 1,
        "dim": 8,
        "num_outputs": 2,
        "fuse_levels": True,
        "num_heads": 1,
        "spatial_dims": 3,
        "value_source": "level0",
        "in_channels": 1,
        "attn_stride": 4,
        "mask_min_inside": 1.0,
        "mask_margin": 1,
        "residual_average": False,
        "init_sharpness": 1.0,
        "position_prior": [3, 3, 2],
        "prior_gain": 10.0,
    }
    return {**record, **changes}


def test_head_record_rebuilds_the_same_head():
    torch.manual_seed(0)
    head = TagAttentionHead(
        [4, 6, 8], num_tags=2, config=TagHeadConfig(dim=8, level=1, position_prior=[3, 3, 2])
    )
    record = head.head_config()
    assert record["config"] == {
        "dim": 8,
        "queries": "text",
        "level": 1,
        "position_prior": [3, 3, 2],
        "min_inside": 1.0,
        "margin": 1,
    }
    rebuilt = TagAttentionHead.from_config(record)
    rebuilt.load_state_dict(head.state_dict())
    features = [torch.randn(1, 4, 8, 8, 8), torch.randn(1, 6, 4, 4, 4), torch.randn(1, 8, 2, 2, 2)]
    mask = torch.ones(1, 1, 8, 8, 8)
    for got, want in zip(rebuilt(features, mask), head(features, mask), strict=True):
        torch.testing.assert_close(got, want)
    # the flat record of the previous version, with the settings that were kept, is the same head
    flat = TagAttentionHead.from_config(_flat_record())
    assert flat.head_config() == record
    flat.load_state_dict(head.state_dict())
    with pytest.raises(ValueError, match="expected"):
        TagAttentionHead.from_config({**record, "extra": 1})
    with pytest.raises(ValueError, match="unknown keys"):
        TagAttentionHead.from_config(_flat_record(extra=1))


@pytest.mark.parametrize(
    "changes, setting",
    [
        ({"residual_average": True}, "residual_average"),
        ({"value_source": "patch"}, "value_source"),
        ({"init_sharpness": 4.0}, "init_sharpness"),
        ({"prior_gain": 30.0}, "prior_gain"),
        ({"fuse_levels": False}, "fuse_levels"),
    ],
)
def test_flat_record_with_a_removed_setting_is_refused(changes, setting):
    with pytest.raises(ValueError, match=f"trained with {setting}=.*removed"):
        TagAttentionHead.from_config(_flat_record(**changes))


def test_flat_record_defaults_and_irrelevant_settings():
    """Absent keys held the old constructor defaults (the CSRA path was on); a removed setting that
    could not act (the gain without a prior, fusion at the deepest level) does not matter."""
    record = _flat_record()
    del record["residual_average"]
    with pytest.raises(ValueError, match="residual_average=True"):
        TagAttentionHead.from_config(record)
    head = TagAttentionHead.from_config(
        _flat_record(attn_level=2, fuse_levels=False, position_prior=None, prior_gain=30.0)
    )
    assert head.fusion is None and head.config.position_prior is None and head.level == 2
