"""Channels-last memory format for the convolution weights of a model (``train.channels_last``): a
speed setting, not a numeric one.

oneDNN (CPU) runs 3D convolutions faster on NDHWC tensors than on the default NCDHW: on 2 CPU
cores the stage 1 demo model's forward and backward took 0.35 s instead of 0.48 s (0.45 s instead
of 0.66 s per step with data loading and augmentation), while the stage 2 U-Net at batch 2 gained
nothing. ``benchmarks/bench_train_step.py`` measures it on your machine and device. A convolution
whose weight is channels-last returns a channels-last output, but norm layers and one-channel
convolutions may hand on the default format, so each converted convolution also converts its input
(a no-op when it is already channels-last).

``torch.nn.Module.to(memory_format=...)`` converts the weights but leaves their ``state_dict``
non-contiguous, which safetensors (our weight format, and accelerate's) refuses to write. The hook
registered here hands out contiguous copies, so checkpoints and exports are the same bytes with the
setting on or off, and a checkpoint loads into a model either way.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_channels_last", "to_channels_last"]

_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
_MARK = "_mosmos_channels_last"


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters and buffers ``module`` holds itself (not its children's)."""
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def _contiguous_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name, _ in _own_tensors(module):
        key = prefix + name
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            state_dict[key] = value.contiguous()


def _channels_last_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.ndim in _FORMATS:
        return (x.contiguous(memory_format=_FORMATS[x.ndim]), *args[1:])
    return None


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4D / 5D parameter and buffer of ``model`` channels-last, in place.

    Parameters keep their identity (an optimizer built before or after still holds them); only
    their layout changes. ``state_dict()`` of ``model`` or of any submodule stays contiguous.
    Calling it twice is harmless.
    """
    for module in model.modules():
        converted = False
        for _, tensor in _own_tensors(module):
            fmt = _FORMATS.get(tensor.ndim)
            if fmt is None:
                continue
            tensor.data = tensor.data.contiguous(memory_format=fmt)
            converted = True
        if converted and not getattr(module, _MARK, False):
            module.register_state_dict_post_hook(_contiguous_state)
            # a norm layer or a one-channel convolution may hand on the default layout: the
            # convolution's input is made channels-last too (a no-op when it already is)
            module.register_forward_pre_hook(_channels_last_input)
            setattr(module, _MARK, True)
    return model


def is_channels_last(model: nn.Module) -> bool:
    """Whether every 4D / 5D parameter of ``model`` is stored channels-last (False if it has none)."""
    found = False
    for p in model.parameters():
        fmt = _FORMATS.get(p.ndim)
        if fmt is None:
            continue
        found = True
        if not p.is_contiguous(memory_format=fmt):
            return False
    return found
