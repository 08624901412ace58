"""Stage 2 segmenters (unet, mo_ctrans, mo_ctrans_conv, unetr) and the plain ViT encoder: shapes, gradients, task
tokens, window attention, MOSMOS attention-map transfer, rebuilding from the config."""

from __future__ import annotations

import pytest
import torch

from mosmos.models import (
    TagAttentionHead,
    TagHeadConfig,
    ViTEncoder,
    create_image_encoder,
    create_model,
    list_models,
)
from mosmos.models.segmentation import (
    MOCTransConvSegmenter,
    MOCTransSegmenter,
    SegmenterBase,
    TaskTokenTransformer,
)
from mosmos.models.segmentation.common import sinusoidal_position
from mosmos.models.segmentation.unetr import unetr_stage_strides

torch.set_num_threads(2)

NAMES = ("unet", "mo_ctrans", "mo_ctrans_conv", "unetr")
TOKEN_NAMES = ("mo_ctrans", "mo_ctrans_conv")  # task-conditioned
SHAPES = {3: (2, 1, 32, 32, 16), 2: (2, 1, 32, 32)}
DECODER = {"unet": {}, "mo_ctrans": {}, "mo_ctrans_conv": {}, "unetr": {"feature_size": 8}}


def tiny_encoder(sd: int = 3, strides=(2, 2, 2, 2)):
    return create_image_encoder(
        f"rescnn{sd}d", channels=(8, 16, 16, 24), strides=strides, num_res_units=1, norm="batch"
    )


def tiny_head(encoder, num_tags: int = 3, **settings):
    """A tag head at level 1 (stride 4) with the tuned settings, without a location prior unless asked."""
    config = TagHeadConfig(**{"dim": 8, "level": 1, "position_prior": None, **settings})
    return TagAttentionHead(encoder.feature_channels, num_tags, config, spatial_dims=encoder.spatial_dims)


def build(name, sd=3, num_tasks=2, head=False, strides=(2, 2, 2, 2), **kwargs):
    encoder = tiny_encoder(sd, strides)
    return create_model(
        "segmenter",
        name,
        encoder=encoder,
        num_classes=3,
        num_tasks=num_tasks,
        attention_head=tiny_head(encoder) if head else None,
        **{**DECODER[name], **kwargs},
    )


def test_registry_lists_the_segmenters():
    assert set(list_models("segmenter")) == {*NAMES, "ensemble"}  # ensemble: of one of NAMES
    assert {"vit3d", "vit2d"} <= set(list_models("image_encoder"))


@pytest.mark.parametrize("sd", [3, 2])
@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_gradients(name, sd):
    torch.manual_seed(0)
    net = build(name, sd, head=True)
    assert isinstance(net, SegmenterBase) and net.model_name == name
    x = torch.randn(SHAPES[sd])
    y = net(x, task=torch.tensor([0, 1]))
    assert y.shape == (2, 3, *SHAPES[sd][2:])
    (y * torch.randn_like(y)).sum().backward()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad
    groups = {"encoder.", "attention_head.", "out."}
    for prefix in groups:
        assert any(n.startswith(prefix) for n in trainable), prefix
    if name == "mo_ctrans_conv":
        # both tasks in the batch: both rows of every stage's task embedding get a gradient
        for t in net.transformers:
            assert (t.task_token.weight.grad.abs().sum(dim=1) > 0).all()
    if name == "mo_ctrans":  # one task embedding, both rows used
        assert (net.task_token.weight.grad.abs().sum(dim=1) > 0).all()
    n_enc = sum(p.numel() for p in net.encoder_parameters())
    n_dec = sum(p.numel() for p in net.decoder_parameters())
    assert n_enc == sum(
        p.numel() for n, p in trainable.items() if n.startswith(("encoder.", "attention_head."))
    )
    assert n_enc + n_dec == sum(p.numel() for p in trainable.values())


@pytest.mark.parametrize("name", NAMES)
def test_stride_one_first_level_and_no_stem(name):
    net = build(name, 3, strides=(1, 2, 2, 2))
    y = net(torch.randn(1, 1, 16, 16, 8), task=torch.tensor([1]))
    assert y.shape == (1, 3, 16, 16, 8)
    if name != "unetr":
        assert not net.has_stem


@pytest.mark.parametrize("name", NAMES)
def test_input_not_divisible_by_total_stride(name):
    net = build(name, 3)
    with pytest.raises(ValueError, match="divisible by the encoder's total stride 16"):
        net(torch.randn(1, 1, 32, 32, 12), task=torch.tensor([0]))


@pytest.mark.parametrize("name", TOKEN_NAMES)
def test_mo_ctrans_depends_on_task_and_checks_ids(name):
    torch.manual_seed(0)
    net = build(name, 3, num_tasks=3).eval()
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        y0 = net(x, task=torch.tensor([0]))
        y1 = net(x, task=torch.tensor([1]))
        y0_again = net(x, task=torch.tensor([0]))
    assert torch.equal(y0, y0_again)
    assert (y0 - y1).abs().max() > 1e-4
    assert net.task_conditioned  # inference runs a pass per task for it
    for bad in (3, -1):
        with pytest.raises(ValueError, match=r"valid ids are 0\.\.2"):
            net(x, task=torch.tensor([bad]))
    with pytest.raises(ValueError, match="task ids are required"):
        net(x)
    single = build(name, 3, num_tasks=1).eval()
    with torch.no_grad():
        assert torch.equal(single(x), single(x, task=torch.tensor([0])))


def test_unet_and_unetr_ignore_task():
    torch.manual_seed(0)
    for name in ("unet", "unetr"):
        net = build(name, 3, num_tasks=2).eval()
        x = torch.randn(1, 1, 32, 32, 16)
        with torch.no_grad():
            assert torch.equal(net(x, task=torch.tensor([0])), net(x, task=torch.tensor([1])))
        assert not net.task_conditioned  # inference runs a single pass for every task


def test_mo_ctrans_conv_window_path_single_window_equals_full_attention():
    torch.manual_seed(0)
    full = build("mo_ctrans_conv", 3, max_tokens=10**9).eval()
    windowed = build("mo_ctrans_conv", 3, max_tokens=0, window_size=1000).eval()
    windowed.load_state_dict(full.state_dict())
    # 16^3 keeps the full-attention reference small (4096 tokens at full resolution)
    x = torch.randn(2, 1, 16, 16, 16)
    task = torch.tensor([1, 0])
    with torch.no_grad():
        torch.testing.assert_close(windowed(x, task), full(x, task), rtol=1e-5, atol=1e-5)
        # with small windows the fine stages attend locally: a different function
        local = build("mo_ctrans_conv", 3, max_tokens=16, window_size=2).eval()
        local.load_state_dict(full.state_dict())
        assert (local(x, task) - full(x, task)).abs().max() > 1e-4
    finest = local.transformers[-1]
    assert finest.window_shape((16, 16, 16)) == (2, 2, 2)


def test_task_token_transformer_matches_a_direct_full_attention_reference():
    """The partition / reverse code against tokens laid out by hand and MONAI blocks called directly."""
    torch.manual_seed(0)
    layer = TaskTokenTransformer(3, dim=12, num_tasks=2, depth=2, num_heads=2, max_tokens=1000).eval()
    x = torch.randn(2, 12, 4, 3, 2)
    task = torch.tensor([1, 0])
    with torch.no_grad():
        out = layer(x, task)
        tokens = x.flatten(2).transpose(1, 2)
        position = sinusoidal_position((4, 3, 2), 12)
        seq = torch.cat([layer.task_token(task)[:, None], tokens + position], dim=1)
        for block in layer.blocks:
            seq = block(seq)
        # the blocks' update, scaled per channel, joins the features; the position codes do not
        update = seq[:, 1:] - tokens - position
        ref = (tokens + layer.layer_scale * update).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, ref)
    assert torch.equal(layer.layer_scale, torch.full((12,), 0.1))


@pytest.mark.parametrize("grid", [(8, 4, 4), (6, 4, 4)])
def test_window_attention_equals_attention_on_each_window(grid):
    """Windowed output == the same layer (full attention) applied to each window on its own; the
    (6, 4, 4) grid needs a padded, masked second window."""
    torch.manual_seed(0)
    layer = TaskTokenTransformer(
        3, dim=8, num_tasks=2, depth=1, num_heads=2, max_tokens=64, window_size=4
    ).eval()
    x = torch.randn(2, 8, *grid)
    task = torch.tensor([0, 1])
    assert layer.window_shape(grid) == (4, 4, 4)
    with torch.no_grad():
        out = layer(x, task)
        parts = [layer(x[:, :, :4], task), layer(x[:, :, 4:], task)]  # <= 64 tokens: full attention
    assert layer.window_shape(tuple(x[:, :, 4:].shape[2:])) == tuple(x[:, :, 4:].shape[2:])
    torch.testing.assert_close(out, torch.cat(parts, dim=2))
    # and the windows really are separate: a change in window 1 leaves window 0 alone
    x2 = x.clone()
    x2[:, :, 5, 1, 1] += 10.0
    with torch.no_grad():
        out2 = layer(x2, task)
    torch.testing.assert_close(out2[:, :, :4], out[:, :, :4])
    assert (out2[:, :, 4:] - out[:, :, 4:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_attention_maps_are_used(name, monkeypatch):
    torch.manual_seed(0)
    net = build(name, 3, head=True).eval()
    x = torch.randn(2, 1, 32, 32, 16)
    mask = torch.zeros(2, 1, 32, 32, 16)
    mask[:, :, 4:28, 6:26, 2:14] = 1
    task = torch.tensor([0, 1])
    with torch.no_grad():
        features, maps = net.encode(x, mask)
        # level 1 of the encoder (stride 4): [B, T, 8, 8, 4], peak 1 per tag, zero outside the body
        assert maps.shape == (2, 3, 8, 8, 4)
        torch.testing.assert_close(maps.flatten(2).amax(2), torch.ones(2, 3))
        assert maps[:, :, 0].abs().max() == 0 and maps[:, :, :, 0].abs().max() == 0
        y = net(x, task, mask)
        # the mask reaches the head: another mask, other maps, other logits
        assert (net(x, task, torch.ones_like(mask)) - y).abs().max() > 1e-5
        # the map channels are read: zero maps give other logits
        monkeypatch.setattr(net, "encode", lambda x, mask=None: (features, torch.zeros_like(maps)))
        assert (net(x, task, mask) - y).abs().max() > 1e-5
    plain = build(name, 3)
    with_head = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("attention_head."))
    assert with_head > sum(p.numel() for p in plain.parameters())  # extra input channels for the maps


def test_segmenter_turns_the_location_prior_off():
    """A stage 1 head's location prior describes whole scans; on a segmenter's patches it is off
    (the maps equal those of the same head without it) and frozen, but its weights still load."""
    torch.manual_seed(0)
    encoder = tiny_encoder(3)
    head = tiny_head(encoder, position_prior=[2, 2, 2])
    with torch.no_grad():
        head.pixel_tag.position_logits.normal_()
    state = {k: v.clone() for k, v in head.state_dict().items()}
    net = create_model("segmenter", "unet", encoder=encoder, num_classes=2, attention_head=head)
    assert not head.pixel_tag.use_position_prior and not head.pixel_tag.position_logits.requires_grad
    net.attention_head.load_state_dict(state)
    plain = tiny_head(encoder)
    plain.load_state_dict({k: v for k, v in state.items() if k != "pixel_tag.position_logits"})
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        features = encoder.forward_features(x)
        torch.testing.assert_close(net.attention_head(features)[1], plain(features)[1])
        head.pixel_tag.use_position_prior = True
        assert (net.attention_head(features)[1] - plain(features)[1]).abs().max() > 1e-4


def test_head_must_match_encoder():
    encoder = tiny_encoder(3)
    other = TagAttentionHead([8, 16, 32, 24], num_tags=2, config=TagHeadConfig(dim=8, level=1))
    with pytest.raises(ValueError, match="feature_channels"):
        create_model("segmenter", "unet", encoder=encoder, num_classes=2, attention_head=other)


@pytest.mark.parametrize("name", NAMES)
def test_decoder_config_rebuilds_the_network(name):
    torch.manual_seed(0)
    net = build(name, 3, head=True).eval()
    cfg = net.config()
    assert cfg["name"] == name and cfg["encoder"]["name"] == "rescnn3d"
    assert cfg["attention_head"]["num_tags"] == 3
    encoder = create_image_encoder(
        cfg["encoder"]["name"], **{k: v for k, v in cfg["encoder"].items() if k != "name"}
    )
    rebuilt = create_model(
        "segmenter",
        name,
        encoder=encoder,
        attention_head=TagAttentionHead.from_config(cfg["attention_head"]),
        **cfg["decoder"],
    ).eval()
    rebuilt.load_state_dict(net.state_dict())  # strict: same keys and shapes
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, torch.tensor([1])), net(x, torch.tensor([1])))


def test_unetr_stage_strides():
    assert unetr_stage_strides([16, 16, 16, 16]) == [2, 4, 8]
    assert unetr_stage_strides([2, 4, 8, 16]) == [2, 4, 8]
    assert unetr_stage_strides([1, 2, 4, 8]) == [1, 2, 4]
    assert unetr_stage_strides([2, 4, 8, 16, 32]) == [2, 4, 8, 16]


@pytest.mark.parametrize("sd", [3, 2])
def test_unetr_with_vit_encoder(sd):
    torch.manual_seed(0)
    size = SHAPES[sd][2:]
    vit_kwargs = {"img_size": list(size), "hidden_size": 16, "mlp_dim": 32, "num_layers": 4, "num_heads": 2}
    net = create_model(
        "segmenter", "unetr", num_classes=2, encoder=f"vit{sd}d", encoder_kwargs=vit_kwargs, feature_size=8
    )
    assert isinstance(net.encoder, ViTEncoder)
    x = torch.randn(SHAPES[sd])
    y = net(x)
    assert y.shape == (2, 2, *size)
    (y * torch.randn_like(y)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.encoder.parameters())
    # the default encoder of the unetr factory is vit3d
    default = create_model(
        "segmenter", "unetr", num_classes=2, encoder_kwargs={**vit_kwargs, "img_size": [32, 32, 16]}
    )
    assert default.encoder.model_name == "vit3d"


def test_vit_encoder_features_and_config():
    torch.manual_seed(0)
    enc = create_image_encoder(
        "vit3d", img_size=(32, 32, 16), hidden_size=16, mlp_dim=32, num_layers=8, num_heads=2
    ).eval()
    assert enc.feature_strides == [16] * 4 and enc.feature_channels == [16] * 4 and enc.embed_dim == 16
    assert enc.feature_layers == [2, 4, 6, 8]
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        features = enc.forward_features(x)
        _, hidden = enc.vit(x)
    assert [tuple(f.shape) for f in features] == [(2, 16, 2, 2, 1)] * 4
    # feature 0 is layer 2's hidden state, token (i, j, k) at grid cell (i, j, k)
    torch.testing.assert_close(features[0][:, :, 1, 0, 0], hidden[1][:, 2])
    rebuilt = create_image_encoder("vit3d", **enc.encoder_config())
    rebuilt.load_state_dict(enc.state_dict())
    with pytest.raises(ValueError, match="img_size"):
        enc.forward_features(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        create_image_encoder("vit2d", img_size=(40, 32), hidden_size=16, num_heads=2)


@pytest.mark.parametrize("cls", [MOCTransSegmenter, MOCTransConvSegmenter])
def test_mo_ctrans_class_rejects_zero_depth(cls):
    with pytest.raises(ValueError, match="depth"):
        cls(tiny_encoder(3), num_classes=2, depth=0)
