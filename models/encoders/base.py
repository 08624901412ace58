"""The one image-encoder interface both stages use, and the mask resizing it shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImageEncoder", "resize_mask", "with_spatial_dims"]

_ADAPTIVE_POOL = {
    ("max", 1): F.adaptive_max_pool1d,
    ("max", 2): F.adaptive_max_pool2d,
    ("max", 3): F.adaptive_max_pool3d,
    ("avg", 1): F.adaptive_avg_pool1d,
    ("avg", 2): F.adaptive_avg_pool2d,
    ("avg", 3): F.adaptive_avg_pool3d,
}


def resize_mask(mask: torch.Tensor, size: Sequence[int], mode: Literal["max", "avg"] = "max") -> torch.Tensor:
    """Downsample a ``[B, 1, *spatial]`` mask to ``size`` by adaptive max or average pooling.

    ``"max"`` keeps a cell when any voxel under it is inside (a boolean mask for attention);
    ``"avg"`` gives the fraction inside (a float weight for pooling). A mask already at ``size``
    is returned as float unchanged.

    Raises:
        ValueError: if the mask is not ``[B, 1, *spatial]`` or is smaller than ``size``.
    """
    size = tuple(int(s) for s in size)
    if mask.ndim != len(size) + 2 or mask.shape[1] != 1:
        raise ValueError(
            f"mask must have shape [B, 1, *spatial] with {len(size)} spatial dims, got {tuple(mask.shape)}"
        )
    mask = mask.float()
    if tuple(mask.shape[2:]) == size:
        return mask
    if any(m < s for m, s in zip(mask.shape[2:], size, strict=True)):
        raise ValueError(
            f"mask of spatial size {tuple(mask.shape[2:])} is smaller than the feature map {size}"
        )
    return _ADAPTIVE_POOL[(mode, len(size))](mask, size)


def with_spatial_dims(kwargs: dict[str, Any], dims: int, name: str) -> dict[str, Any]:
    """Builder kwargs with ``spatial_dims=dims`` for the registered ``name`` (e.g. ``rescnn3d``).

    ``encoder_config()`` includes ``spatial_dims`` so that it describes itself; a builder accepts it
    back when it agrees with the registered name.
    """
    given = kwargs.pop("spatial_dims", dims)
    if given != dims:
        raise ValueError(f"{name} is {dims}D; got spatial_dims={given}")
    return {"spatial_dims": dims, **kwargs}


class ImageEncoder(nn.Module):
    """Base class of image encoders: multi-scale features, a pooled embedding, a rebuildable config.

    Subclasses set ``spatial_dims``, ``in_channels``, ``feature_channels`` and ``feature_strides``
    (one entry per scale, high resolution first; strides relative to the input), ``embed_dim``
    (size of the pooled embedding, the deepest map's channels) and implement
    :meth:`forward_features` and :meth:`encoder_config`.
    """

    spatial_dims: int
    in_channels: int
    feature_channels: list[int]
    feature_strides: list[int]
    embed_dim: int

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale feature maps ``[B, feature_channels[i], *spatial / feature_strides[i]]``."""
        raise NotImplementedError

    def encoder_config(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this encoder with its registered builder (subclasses keep
        them in ``self._config``)."""
        return dict(self._config)

    def forward_pooled(
        self, features: Sequence[torch.Tensor], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Global average of the deepest map, restricted to the body when ``mask`` is given.

        Args:
            features: output of :meth:`forward_features`.
            mask: optional ``[B, 1, *spatial]`` body mask at input (or deepest-map) resolution;
                it is average-pooled to the deepest map, so each cell is weighted by the fraction
                of body voxels under it. A sample whose mask is empty falls back to the plain mean.

        Returns:
            ``[B, embed_dim]``.
        """
        deepest = features[-1]
        flat = deepest.flatten(2)
        if mask is None:
            return flat.mean(dim=2)
        weight = resize_mask(mask, deepest.shape[2:], mode="avg").flatten(2).to(flat.dtype)
        total = weight.sum(dim=2, keepdim=True)
        weight = torch.where(
            total > 0, weight / total.clamp_min(torch.finfo(flat.dtype).tiny), 1.0 / flat.shape[2]
        )
        return (flat * weight).sum(dim=2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
        """``{"features": list of maps, "pooled": [B, embed_dim]}``."""
        features = self.forward_features(x)
        return {"features": features, "pooled": self.forward_pooled(features, mask)}

    def _check_input(self, x: torch.Tensor, divisor: int) -> None:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects [B, {self.in_channels}, *{self.spatial_dims} spatial dims], "
                f"got {tuple(x.shape)}"
            )
        if any(s % divisor for s in x.shape[2:]):
            raise ValueError(
                f"{type(self).__name__}: spatial size {tuple(x.shape[2:])} must be divisible by {divisor} "
                f"(the total stride), so that feature strides are exact"
            )
