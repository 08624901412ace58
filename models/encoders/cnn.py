"""Residual CNN encoder built from MONAI blocks, with position-neutral convolution padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from mosmos.models.encoders.base import ImageEncoder, with_spatial_dims
from mosmos.models.registry import register_model

__all__ = ["PADDING_MODES", "ResCNNEncoder", "rescnn2d", "rescnn3d", "set_padding_mode"]

PADDING_MODES = ("replicate", "reflect", "zeros", "circular")


def set_padding_mode(module: nn.Module, padding_mode: str) -> nn.Module:
    """Switch every padded convolution in ``module`` to ``padding_mode`` in place.

    MONAI's ``Convolution`` and ``ResidualUnit`` take ``padding`` but not ``padding_mode`` and
    always build zero-padded ``nn.ConvNd``. Zero padding lets a network tell the volume border
    from the inside (a pilot's attention maps peaked on the border, see DESIGN.md), so we switch
    the built convolutions afterwards: ``nn.ConvNd`` reads ``padding_mode`` at every forward and
    pads with ``F.pad`` when it is not ``"zeros"``, with the same output size.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode={padding_mode!r} is not one of {PADDING_MODES}")
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and any(p > 0 for p in m.padding):
            m.padding_mode = padding_mode
    return module


class ResCNNEncoder(ImageEncoder):
    """Residual CNN image encoder: one stage per scale, each a strided MONAI ``Convolution``
    followed by ``num_res_units`` MONAI ``ResidualUnit`` blocks (He et al., "Deep Residual
    Learning for Image Recognition", CVPR 2016; blocks as in MONAI's ``UNet``).

    No absolute position embedding, and convolutions pad with ``padding_mode`` (replicate by
    default) rather than zeros, so features cannot read the distance to the volume border.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for CT).
        channels: output channels of each stage; also the feature pyramid's channels.
        strides: stride of each stage's first convolution (same length as ``channels``).
        num_res_units: residual units after each stage's strided convolution (0: plain conv net);
            one number for every stage, or one per stage.
        kernel_size: convolution kernel size (odd).
        stem: the first stage's strided convolution: ``"conv"`` (``kernel_size``, padded, as every
            stage) or ``"patch"`` (kernel = stride, no padding: non-overlapping patches, as the
            patch embedding of a ViT; cheaper, and no padding at the volume border).
        norm: MONAI norm name or ``(name, kwargs)``, e.g. ``"instance"``, ``"batch"``.
        act: MONAI activation name or ``(name, kwargs)``.
        dropout: dropout probability inside the blocks.
        padding_mode: ``"replicate"`` (default), ``"reflect"``, ``"zeros"`` or ``"circular"``.

    Example::

        encoder = ResCNNEncoder(3, 1, channels=(16, 32, 64, 128), strides=(1, 2, 2, 2))
        out = encoder(torch.randn(2, 1, 64, 64, 32))
        [f.shape[1] for f in out["features"]]  # [16, 32, 64, 128]; strides [1, 2, 4, 8]
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (1, 2, 2, 2),
        num_res_units: int | Sequence[int] = 2,
        kernel_size: int = 3,
        norm: str | tuple = "instance",
        act: str | tuple = "prelu",
        dropout: float = 0.0,
        padding_mode: str = "replicate",
        stem: str = "conv",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={spatial_dims} must be 2 or 3")
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels} must be >= 1")
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels={tuple(channels)} must be a non-empty sequence of positive ints")
        if len(strides) != len(channels) or any(s < 1 for s in strides):
            raise ValueError(
                f"strides={tuple(strides)} must hold one positive int per stage ({len(channels)} stages)"
            )
        units = [num_res_units] * len(channels) if isinstance(num_res_units, int) else list(num_res_units)
        if len(units) != len(channels) or any(not isinstance(u, int) or u < 0 for u in units):
            raise ValueError(
                f"num_res_units={num_res_units} must be an int >= 0 or one per stage ({len(channels)} stages)"
            )
        if stem not in ("conv", "patch"):
            raise ValueError(f"stem={stem!r} must be 'conv' or 'patch'")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be a positive odd int")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode={padding_mode!r} is not one of {PADDING_MODES}")

        self._config = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "channels": [int(c) for c in channels],
            "strides": [int(s) for s in strides],
            "num_res_units": num_res_units if isinstance(num_res_units, int) else units,
            "kernel_size": kernel_size,
            "norm": norm,
            "act": act,
            "dropout": dropout,
            "padding_mode": padding_mode,
            **({"stem": stem} if stem != "conv" else {}),
        }
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.feature_channels = [int(c) for c in channels]
        self.feature_strides = []
        total = 1
        for s in strides:
            total *= int(s)
            self.feature_strides.append(total)
        self.embed_dim = self.feature_channels[-1]

        block = {"kernel_size": kernel_size, "norm": norm, "act": act, "dropout": dropout or None}
        self.stages = nn.ModuleList()
        prev = in_channels
        for i, (c, s, n) in enumerate(zip(channels, strides, units, strict=True)):
            first = {**block, "kernel_size": int(s), "padding": 0} if (i == 0 and stem == "patch") else block
            layers: list[nn.Module] = [Convolution(spatial_dims, prev, c, strides=s, **first)]
            layers += [ResidualUnit(spatial_dims, c, c, subunits=2, **block) for _ in range(n)]
            self.stages.append(nn.Sequential(*layers))
            prev = c
        set_padding_mode(self, padding_mode)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_input(x, self.feature_strides[-1])
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


@register_model("image_encoder", "rescnn3d")
def rescnn3d(**kwargs: Any) -> ResCNNEncoder:
    """3D residual CNN encoder (see :class:`ResCNNEncoder`)."""
    return ResCNNEncoder(**with_spatial_dims(kwargs, 3, "rescnn3d"))


@register_model("image_encoder", "rescnn2d")
def rescnn2d(**kwargs: Any) -> ResCNNEncoder:
    """2D residual CNN encoder (see :class:`ResCNNEncoder`)."""
    return ResCNNEncoder(**with_spatial_dims(kwargs, 2, "rescnn2d"))
