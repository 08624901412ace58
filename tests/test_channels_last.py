"""Channels-last weights: same numbers, contiguous state dicts, and engine runs that save and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mosmos.channels_last import is_channels_last, to_channels_last
from mosmos.engine import Engine, TrainConfig
from mosmos.models.registry import create_image_encoder

# Channels-last runs the same convolutions with another summation order, so results differ by float32
# rounding: about 1e-6 of a tensor's largest entry after a few 3D convolutions (their reductions sum
# tens to thousands of products), on AVX-512 and AVX2 kernels alike. 1e-4 leaves a wide margin and
# still catches a wrong layout, which changes results by O(1). The tolerance is set by the tensor's
# scale, not per element: entries near zero carry the same absolute rounding as the large ones.
RTOL = 1e-4


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, scale: float, msg: str = "") -> None:
    """max|actual - expected| <= RTOL * scale."""
    err = float((actual.detach().double() - expected.detach().double()).abs().max())
    assert err <= RTOL * scale, f"{msg}: max|a - b| = {err:.3g} > {RTOL} * {scale:.3g}"


def _max_abs(*tensors: torch.Tensor) -> float:
    return max(float(t.detach().double().abs().max()) for t in tensors)


def _encoder():
    torch.manual_seed(0)
    return create_image_encoder(
        "rescnn3d", spatial_dims=3, in_channels=1, channels=[4, 8, 8], strides=[2, 2, 2], num_res_units=1
    )


def test_same_outputs_and_gradients():
    ref = _encoder()
    fast = to_channels_last(copy.deepcopy(ref))
    assert is_channels_last(fast) and not is_channels_last(ref)
    x = torch.randn(2, 1, 16, 16, 8)
    out_ref, out_fast = ref(x), fast(x)
    for i, (a, b) in enumerate(zip(out_ref["features"], out_fast["features"], strict=True)):
        assert_close_to_scale(b, a, _max_abs(a), msg=f"features[{i}]")
    out_ref["pooled"].square().sum().backward()
    out_fast["pooled"].square().sum().backward()
    # Gradients are compared at the scale of their layer (the largest gradient among the module's own
    # parameters): the bias of a convolution followed by a normalisation has a zero gradient in exact
    # arithmetic (the norm removes any constant shift), so both layouts give it pure rounding noise,
    # ~1e-7 of the weight gradient computed from the same upstream gradient.
    fast_modules = dict(fast.named_modules())
    for name, module in ref.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.grad is not None]
        if not own:
            continue
        scale = _max_abs(*(p.grad for _, p in own))
        assert scale > 0, name
        twin = dict(fast_modules[name].named_parameters(recurse=False))
        for n, p in own:
            assert_close_to_scale(twin[n].grad, p.grad, scale, msg=f"{name}.{n}")


def test_state_dicts_stay_contiguous_and_load_either_way(tmp_path):
    ref = _encoder()
    fast = to_channels_last(copy.deepcopy(ref))
    to_channels_last(fast)  # twice is harmless (one hook per module)
    stage = next(m for m in fast.modules() if isinstance(m, nn.Conv3d))
    for sd in (fast.state_dict(), stage.state_dict()):  # the whole model and a submodule
        assert all(v.is_contiguous() for v in sd.values())
    save_file(fast.state_dict(), tmp_path / "w.safetensors")  # safetensors refuses strided tensors
    loaded = load_file(tmp_path / "w.safetensors")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
    # a contiguous checkpoint loads into a channels-last model and keeps its layout
    other = to_channels_last(_encoder())
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(loaded)
    assert is_channels_last(other)
    expected = ref(torch.ones(1, 1, 16, 16, 8))["pooled"]
    actual = other(torch.ones(1, 1, 16, 16, 8))["pooled"]
    assert_close_to_scale(actual, expected, _max_abs(expected), msg="pooled")


class Volumes(torch.utils.data.Dataset):
    def __init__(self, n: int = 24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 8, 8, 8, generator=g)
        self.y = self.x[:, :, 2:6, 2:6, 2:6].mean(dim=(1, 2, 3, 4))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class Killed(Exception):
    pass


class ConvTask:
    def __init__(self, kill_at: int | None = None):
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1, padding_mode="replicate", bias=False),  # BN follows: a bias would
            # get only rounding noise for a gradient, which Adam turns into full-size steps
            nn.BatchNorm3d(4),
            nn.PReLU(),
            nn.Conv3d(4, 4, 3, padding=1, padding_mode="replicate"),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(4, 1),
        )
        self.train_dataset = Volumes()
        self.collate_fn = None
        self.calls, self.kill_at, self.layouts = 0, kill_at, []

    def step(self, model, batch):
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed  # like SIGKILL: nothing after this point is saved
        self.layouts.append(is_channels_last(model))
        loss = ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        return {"loss": loss}

    def evaluate(self, model, epoch):
        return {}


def _fit(tmp, channels_last, kill_at=None, resume=None):
    cfg = TrainConfig(
        epochs=3,
        batch_size=4,
        lr=1e-2,
        warmup_steps=1,
        checkpoint_every=5,
        deterministic=True,
        channels_last=channels_last,
        resume=resume,
    )
    task = ConvTask(kill_at=kill_at)
    Engine(task, cfg, tmp, seed=1).fit()
    return task


@pytest.mark.parametrize("kill", [False, True])
def test_engine_trains_saves_and_resumes_channels_last(tmp_path, kill):
    """18 steps channels-last (killed in step 8 and resumed from step 5, or not) end where the
    default layout ends."""
    plain = _fit(tmp_path / "plain", channels_last=False)
    if kill:
        with pytest.raises(Killed):
            _fit(tmp_path / "fast", channels_last=True, kill_at=8)
        fast = _fit(tmp_path / "fast", channels_last=True, resume="latest")
    else:
        fast = _fit(tmp_path / "fast", channels_last=True)
    assert fast.layouts and all(fast.layouts) and not any(plain.layouts)
    for (k, a), b in zip(plain.model.state_dict().items(), fast.model.state_dict().values(), strict=True):
        assert_close_to_scale(b, a, _max_abs(a), msg=k)
