"""Image encoders: registry sweep (forward, backward, every parameter's gradient, strides) and masks."""

import pytest
import torch
from torch import nn

from mosmos.models import (
    ImageEncoder,
    create_image_encoder,
    list_models,
    register_model,
    registry,
    resize_mask,
)
from mosmos.models.registry import create_model

torch.set_num_threads(2)

# Tiny settings per registered encoder; a new encoder must add its own here (the sweep checks that).
TINY = {
    "rescnn3d": ({"channels": (4, 8, 8), "strides": (1, 2, 2), "num_res_units": 1}, (2, 1, 16, 16, 8)),
    "rescnn2d": ({"channels": (4, 8, 8), "strides": (1, 2, 2), "num_res_units": 1}, (2, 1, 16, 16)),
    "swinvit3d": (
        {"feature_size": 6, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2), "window_size": 4},
        (1, 1, 32, 32, 32),
    ),
    "swinvit2d": (
        {"feature_size": 6, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2), "window_size": 4},
        (2, 1, 32, 32),
    ),
    "vit3d": (
        {"img_size": (32, 32, 16), "hidden_size": 16, "mlp_dim": 32, "num_layers": 4, "num_heads": 2},
        (2, 1, 32, 32, 16),
    ),
    "vit2d": (
        {"img_size": (32, 32), "hidden_size": 16, "mlp_dim": 32, "num_layers": 4, "num_heads": 2},
        (2, 1, 32, 32),
    ),
}


def test_every_registered_encoder_has_tiny_settings():
    assert set(list_models("image_encoder")) == set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_registry_sweep_forward_backward(name):
    torch.manual_seed(0)
    kwargs, shape = TINY[name]
    encoder = create_image_encoder(name, **kwargs)
    assert isinstance(encoder, ImageEncoder)
    assert encoder.model_name == name
    x = torch.randn(shape)
    out = encoder(x)
    features = out["features"]
    assert len(features) == len(encoder.feature_channels) == len(encoder.feature_strides)
    for f, c, s in zip(features, encoder.feature_channels, encoder.feature_strides, strict=True):
        assert f.shape[:2] == (shape[0], c)
        assert tuple(f.shape[2:]) == tuple(n // s for n in shape[2:])
    assert encoder.feature_strides == sorted(encoder.feature_strides)
    assert out["pooled"].shape == (shape[0], encoder.embed_dim)
    # A random linear read-out of every level, so that no parameter's gradient cancels out.
    loss = (
        sum((f * torch.randn_like(f)).sum() for f in features)
        + (out["pooled"] * torch.randn_like(out["pooled"])).sum()
    )
    loss.backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("name", sorted(TINY))
def test_encoder_config_rebuilds_same_architecture(name):
    kwargs, shape = TINY[name]
    torch.manual_seed(0)
    encoder = create_image_encoder(name, **kwargs).eval()
    torch.manual_seed(1)  # different initial weights: equal outputs below come from the loaded state
    rebuilt = create_image_encoder(name, **encoder.encoder_config()).eval()
    assert rebuilt.encoder_config() == encoder.encoder_config()
    assert rebuilt.feature_strides == encoder.feature_strides
    x = torch.randn(shape)
    with torch.no_grad():
        before = rebuilt(x)["pooled"]
        want = encoder(x)
    assert not torch.allclose(before, want["pooled"])
    result = rebuilt.load_state_dict(encoder.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        got = rebuilt(x)
    # same weights, same input, same kernels: the outputs agree to the last bit
    torch.testing.assert_close(got["pooled"], want["pooled"], rtol=0, atol=0)
    for g, w in zip(got["features"], want["features"], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="rescnn3d"):
        create_image_encoder("resnet-9000")
    with pytest.raises(ValueError, match="image_encoder"):
        list_models("no-such-family")


def test_registry_families_and_duplicates(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {k: dict(v) for k, v in registry._REGISTRY.items()})

    @register_model("test_family", "tiny")
    def tiny() -> nn.Module:
        return nn.Linear(2, 2)

    assert list_models("test_family") == ["tiny"]
    assert "tiny" in list_models()
    assert isinstance(create_model("test_family", "tiny"), nn.Linear)
    with pytest.raises(ValueError, match="already registered"):
        register_model("test_family", "tiny")(tiny)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"channels": (4, 8), "strides": (1, 2, 2)}, "strides"),
        ({"norm": "instance", "padding_mode": "edge"}, "padding_mode"),
        ({"dropout": 1.5}, "dropout"),
        ({"spatial_dims": 2}, "spatial_dims"),
        ({"channels": (4, 8), "strides": (2, 2), "num_res_units": (1, 1, 1)}, "num_res_units"),
        ({"num_res_units": -1}, "num_res_units"),
        ({"stem": "pixel"}, "stem"),
    ],
)
def test_rescnn_rejects_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        create_image_encoder("rescnn3d", **kwargs)


def test_patch_stem_and_per_stage_units():
    """stem=patch: the first convolution cuts non-overlapping 2x2x2 patches (each output voxel sees
    only its own patch); num_res_units per stage; the config rebuilds the same network."""
    kwargs = {"channels": (4, 8, 8), "strides": (2, 2, 2), "num_res_units": (0, 1, 2), "stem": "patch"}
    encoder = create_image_encoder("rescnn3d", **kwargs, norm=None)
    first = next(m for m in encoder.modules() if isinstance(m, nn.Conv3d))
    assert first.kernel_size == (2, 2, 2) and first.stride == (2, 2, 2) and first.padding == (0, 0, 0)
    units = [sum(type(m).__name__ == "ResidualUnit" for m in stage) for stage in encoder.stages]
    assert units == [0, 1, 2]
    x = torch.zeros(1, 1, 16, 16, 8)
    x[0, 0, 4:6, 6:8, 2:4] = 1.0  # exactly one 2x2x2 patch: output voxel (2, 3, 1)
    with torch.no_grad():
        f = encoder.forward_features(x)[0]
        base = encoder.forward_features(torch.zeros_like(x))[0]
    changed = (f - base).abs().sum(1)[0].nonzero().tolist()
    assert changed == [[2, 3, 1]]
    config = encoder.encoder_config()
    assert config["num_res_units"] == [0, 1, 2] and config["stem"] == "patch"
    rebuilt = create_image_encoder("rescnn3d", **config)
    rebuilt.load_state_dict(encoder.state_dict())  # strict: the same parameters
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.forward_features(x)[0], f, rtol=0, atol=0)
    # the default stem records nothing new: exports written before it existed read the same
    assert "stem" not in create_image_encoder("rescnn3d", **TINY["rescnn3d"][0]).encoder_config()


def test_swin_rejects_indivisible_heads_and_input():
    with pytest.raises(ValueError, match="num_heads"):
        create_image_encoder("swinvit3d", feature_size=6, num_heads=(4, 4, 4, 4))
    encoder = create_image_encoder("swinvit2d", **TINY["swinvit2d"][0])
    with pytest.raises(ValueError, match="divisible by 32"):
        encoder(torch.randn(1, 1, 48, 40))


def test_cnn_convolutions_do_not_zero_pad():
    encoder = create_image_encoder("rescnn3d", **TINY["rescnn3d"][0])
    padded = [m for m in encoder.modules() if isinstance(m, nn.Conv3d) and any(p > 0 for p in m.padding)]
    assert padded and all(m.padding_mode == "replicate" for m in padded)


def test_cnn_cannot_see_the_border_of_a_constant_volume():
    # With zero padding a constant input gives position-dependent features near the border; with
    # replicate padding every voxel of every map is the same (no position cue, no position embedding).
    torch.manual_seed(0)
    x = torch.full((1, 1, 16, 16, 8), 0.7)
    kwargs = {**TINY["rescnn3d"][0], "norm": None}
    for mode, constant in (("replicate", True), ("zeros", False)):
        encoder = create_image_encoder("rescnn3d", padding_mode=mode, **kwargs).eval()
        with torch.no_grad():
            f = encoder.forward_features(x)[0]
        spread = (f - f.mean(dim=(2, 3, 4), keepdim=True)).abs().max()
        assert (spread < 1e-5) == constant


def test_masked_pooling_is_the_mean_over_the_body():
    encoder = create_image_encoder("rescnn3d", **TINY["rescnn3d"][0])
    features = [torch.randn(2, 8, 4, 4, 2)]
    mask = torch.zeros(2, 1, 16, 16, 8)
    mask[0, :, :8] = 1  # the first half of the first axis: deepest cells [:2]
    mask[1] = 1
    pooled = encoder.forward_pooled(features, mask)
    torch.testing.assert_close(pooled[0], features[0][0, :, :2].mean(dim=(1, 2, 3)))
    torch.testing.assert_close(pooled[1], features[0][1].mean(dim=(1, 2, 3)))
    # An empty mask falls back to the plain mean instead of dividing by zero.
    empty = encoder.forward_pooled(features, torch.zeros(2, 1, 16, 16, 8))
    torch.testing.assert_close(empty, features[0].mean(dim=(2, 3, 4)))


def test_resize_mask_max_and_avg():
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 0, 0] = 1
    assert resize_mask(mask, (2, 2), "max").tolist() == [[[[1.0, 0.0], [0.0, 0.0]]]]
    assert resize_mask(mask, (2, 2), "avg").tolist() == [[[[0.25, 0.0], [0.0, 0.0]]]]
    with pytest.raises(ValueError, match="smaller"):
        resize_mask(mask, (8, 8))
