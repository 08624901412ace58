"""Pixel-tag attention: one learned query per organ tag attends over every voxel of a feature map."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mosmos.models.encoders.base import resize_mask

__all__ = ["POSITION_PRIOR_GAIN", "PixelTagAttention", "inside_cells"]

#: Scale of the learned location prior's score offsets. Adam moves a parameter by about lr per step
#: whatever its scale, so the gain acts as the prior's learning rate relative to the rest of the
#: head. Fixed: it was a setting, and a stronger gain (30) localised worse than this one.
POSITION_PRIOR_GAIN = 10.0


class PixelTagAttention(nn.Module):
    """Multi-label organ recognition through pixel-tag attention (Tian et al., "MOSMOS: Multi-organ
    segmentation facilitated by medical report supervision", arXiv:2409.02418 / BSPC 2025; queries
    as classes as in Query2Label, Liu et al., arXiv:2107.10834).

    Each tag has a learned query. Keys and values come from a 1×1 convolution of the feature map
    followed by a per-voxel LayerNorm; the query attends over all voxels (scaled dot-product,
    ``num_heads`` heads), restricted to the body when a mask is given. The head-averaged attention
    is the tag's pixel-tag attention map; the attended feature goes through the tag's own linear
    classifier to ``num_outputs`` logits (e.g. visible, abnormal).

    Hand-written rather than ``nn.MultiheadAttention`` / MONAI ``CrossAttentionBlock``: we need the
    per-tag attention map itself, exact zeros outside the mask with no NaN when a mask is empty, and
    tag-specific output heads.

    This is the building block; its defaults restrict nothing. The stage 1 method (with the tuned
    cell restrictions and location prior) is :class:`~mosmos.models.tag_head.TagAttentionHead`.

    Args:
        feature_dim: channels of the feature map (the keys' source).
        num_tags: number of tags (organs).
        dim: attention width.
        num_outputs: logits per tag.
        query_init: optional ``[num_tags, text_dim]`` (e.g. the text encoder's embedding of each
            organ name); the queries start as a random linear projection of it to ``dim``, which
            keeps the names' similarity structure. Random queries when None.
        num_heads: attention heads; ``dim`` must be divisible by it.
        spatial_dims: 1, 2 or 3.
        value_dim: channels of a separate value map passed to ``forward`` (None: values come from
            the key features).
        min_inside: share of a map cell's voxels that must be inside the mask for the attention to
            look there (0: any voxel). See :func:`inside_cells`.
        margin: map cells within this many cells of the map's edge are out of reach.
        position_prior: grid (cells per axis) of a learned per-tag location prior added to the
            scores, flat at the start; None: no prior.

    Example::

        pta = PixelTagAttention(feature_dim=64, num_tags=8)
        logits, attn = pta(torch.randn(2, 64, 16, 16, 8), mask=body)  # body: [2, 1, 64, 64, 32]
        logits.shape, attn.shape  # [2, 8, 2], [2, 8, 16, 16, 8]
    """

    def __init__(
        self,
        feature_dim: int,
        num_tags: int,
        dim: int = 128,
        num_outputs: int = 2,
        query_init: torch.Tensor | None = None,
        num_heads: int = 1,
        spatial_dims: int = 3,
        value_dim: int | None = None,
        min_inside: float = 0.0,
        margin: int = 0,
        position_prior: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"feature_dim={feature_dim} must be >= 1")
        if num_tags < 1:
            raise ValueError(f"num_tags={num_tags} must be >= 1")
        if num_outputs < 1:
            raise ValueError(f"num_outputs={num_outputs} must be >= 1")
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims={spatial_dims} must be 1, 2 or 3")
        if query_init is not None and (query_init.ndim != 2 or query_init.shape[0] != num_tags):
            raise ValueError(
                f"query_init must have shape [num_tags={num_tags}, text_dim], got {tuple(query_init.shape)}"
            )
        if not 0.0 <= min_inside <= 1.0:
            raise ValueError(f"min_inside={min_inside} must be in [0, 1]")
        if margin < 0:
            raise ValueError(f"margin={margin} must be >= 0")
        if position_prior is not None and (len(position_prior) != spatial_dims or min(position_prior) < 1):
            raise ValueError(
                f"position_prior={list(position_prior)} must be {spatial_dims} positive grid sizes "
                f"(one per axis of the {spatial_dims}D map) or None"
            )
        self.num_tags = num_tags
        self.num_outputs = num_outputs
        self.num_heads = num_heads
        self.dim = dim
        self.spatial_dims = spatial_dims
        self.min_inside = min_inside
        self.margin = margin

        # Per-tag learned location prior (a coarse grid of score offsets, upsampled onto the map and
        # added to every scan's scores): after RAS reorientation and the foreground crop an organ sits
        # in about the same place in every scan, which content alone is slow to learn from tags.
        # It starts flat (no preference) and learns from the tag losses only.
        self.position_logits = None
        if position_prior is not None:
            self.position_logits = nn.Parameter(torch.zeros(num_tags, *(int(v) for v in position_prior)))
        # The prior describes where organs lie in a whole, foreground-cropped scan; a user of the
        # attention on patches (the stage 2 segmenter) turns it off.
        self.use_position_prior = True

        if query_init is None:
            queries = torch.randn(num_tags, dim)
        else:
            with torch.no_grad():
                init = query_init.detach().float().cpu()
                queries = nn.Linear(init.shape[1], dim, bias=False)(init - init.mean(dim=0))
                queries = queries / queries.std().clamp_min(1e-6)
        self.queries = nn.Parameter(queries)

        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.embed = conv(feature_dim, dim, kernel_size=1)
        self.feature_norm = nn.LayerNorm(dim)
        # Values may come from other (local) features than the keys: see TagAttentionHead.
        self.value_embed = conv(value_dim, dim, kernel_size=1) if value_dim else None
        self.value_norm = nn.LayerNorm(dim) if value_dim else None
        self.query_norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.out_norm = nn.LayerNorm(dim)
        # Tag-specific classifiers: one [dim, num_outputs] weight per tag (a grouped linear layer).
        self.head_weight = nn.Parameter(torch.randn(num_tags, dim, num_outputs) / math.sqrt(dim))
        self.head_bias = nn.Parameter(torch.zeros(num_tags, num_outputs))

    def position_scores(self, spatial: Sequence[int]) -> torch.Tensor:
        """``[num_tags, *spatial]``: the learned location prior's score offsets on a map of this size
        (``POSITION_PRIOR_GAIN`` times the prior, linearly interpolated)."""
        if self.position_logits is None:
            raise ValueError("this attention has no location prior (position_prior=None)")
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[self.spatial_dims]
        prior = F.interpolate(self.position_logits[None], size=tuple(spatial), mode=mode, align_corners=False)
        return prior[0] * POSITION_PRIOR_GAIN

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tag logits and pixel-tag attention maps.

        Args:
            features: ``[B, feature_dim, *spatial]``, the keys' source.
            mask: optional ``[B, 1, *mask_spatial]`` body mask (nonzero inside) at the map's or a
                finer (e.g. input) resolution; which cells count as inside: :func:`inside_cells`.
            values: ``[B, value_dim, *spatial]`` when the attention was built with ``value_dim``.

        Returns:
            ``logits [B, num_tags, num_outputs]`` and ``attn [B, num_tags, *spatial]``: per tag, the
            attention sums to 1 over the cells inside the mask and is exactly 0 outside; a sample
            whose mask is empty gets all-zero attention and finite logits.
        """
        if features.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"features must be [B, C, *{self.spatial_dims} spatial dims], got {tuple(features.shape)}"
            )
        if (values is None) != (self.value_embed is None):
            raise ValueError("values must be given exactly when the attention was built with value_dim")
        b, _, *spatial = features.shape
        tokens = self.feature_norm(self.embed(features).flatten(2).transpose(1, 2))  # [B, N, dim]
        h, d = self.num_heads, self.dim // self.num_heads
        k = self.to_k(tokens).view(b, -1, h, d).transpose(1, 2)  # [B, h, N, d]
        if values is not None:
            tokens = self.value_norm(self.value_embed(values).flatten(2).transpose(1, 2))
        v = self.to_v(tokens).view(b, -1, h, d).transpose(1, 2)
        q = self.to_q(self.query_norm(self.queries)).view(-1, h, d).transpose(0, 1)  # [h, T, d]
        scores = torch.einsum("htd,bhnd->bhtn", q, k) / math.sqrt(d)  # [B, h, T, N]
        if self.position_logits is not None and self.use_position_prior:
            scores = scores + self.position_scores(spatial).flatten(1)[None, None]

        if mask is not None:
            inside = inside_cells(mask, spatial, self.min_inside, self.margin).unsqueeze(1)  # [B, 1, 1, N]
            # A finite fill (not -inf) keeps an all-masked row finite in forward and backward;
            # multiplying by the mask afterwards makes the outside exactly zero.
            scores = scores.masked_fill(~inside, torch.finfo(scores.dtype).min)
            attn = F.softmax(scores, dim=-1) * inside.to(scores.dtype)
        else:
            attn = F.softmax(scores, dim=-1)

        attended = torch.einsum("bhtn,bhnd->bthd", attn, v).reshape(b, self.num_tags, self.dim)
        logits = torch.einsum("btd,tdk->btk", self.out_norm(attended), self.head_weight) + self.head_bias
        return logits, attn.mean(dim=1).view(b, self.num_tags, *spatial)


def inside_cells(
    mask: torch.Tensor, spatial: Sequence[int], min_inside: float, margin: int = 0
) -> torch.Tensor:
    """``[B, 1, N]`` bool: the cells of a ``spatial`` map that the attention may look at.

    ``min_inside == 0``: a cell counts when any voxel of ``mask`` under it is inside. Otherwise at
    least that share of its voxels must be inside: with 1.0, cells on the body's outline (half air,
    half skin) are out of reach, so the outline (which gives position away) cannot be a shortcut.
    ``margin``: cells within this many of the map's edge are left out too (their features see the
    convolutions' zero padding, the scan's edge: another position shortcut). A sample with no cell
    left falls back to the any-voxel rule.
    """
    touched = resize_mask(mask, spatial, mode="max").flatten(2) > 0
    if min_inside <= 0 and margin <= 0:
        return touched
    if min_inside > 0:
        inside = resize_mask(mask, spatial, mode="avg").flatten(2) >= min_inside - 1e-6
    else:
        inside = touched
    if margin > 0:
        core = torch.zeros(tuple(spatial), dtype=torch.bool, device=mask.device)
        core[tuple(slice(margin, max(margin, s - margin)) for s in spatial)] = True
        inside = inside & core.flatten()
    return torch.where(inside.any(dim=-1, keepdim=True), inside, touched)
