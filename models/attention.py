"""Pixel-tag attention: one learned query per organ tag attends over every voxel of a feature map."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mosmos.models.encoders.base import resize_mask

__all__ = ["VALUE_SOURCES", "PixelTagAttention", "TagAttentionHead", "TopDownFusion"]

#: Where the attention's values come from when keys are fused: the finest encoder level averaged or
#: max-pooled onto the attention grid, or patch embeddings of the input.
VALUE_SOURCES = ("level0", "level0_max", "patch")


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

    Args:
        feature_dim: channels of the feature map.
        num_tags: number of tags (organs).
        dim: attention width.
        num_outputs: logits per tag.
        query_init: optional ``[num_tags, text_dim]`` (e.g. the text encoder's embedding of each
            organ name); the queries start as a random linear projection of it to ``dim``, which
            keeps the names' similarity structure. Random queries when None.
        num_heads: attention heads; ``dim`` must be divisible by it.
        spatial_dims: 2 or 3.

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
        mask_min_inside: float = 0.0,
        mask_margin: int = 0,
        residual_average: bool = True,
        init_sharpness: float = 1.0,
        position_prior: Sequence[int] | None = None,
        prior_gain: float = 10.0,
    ) -> None:
        super().__init__()
        if not init_sharpness > 0:
            raise ValueError(f"init_sharpness={init_sharpness} must be > 0")
        self.residual_average = residual_average
        # per-tag learnable log-multiplier of the attention scores: > 1 starts the attention peaked
        # (larger gradients for where to look) instead of nearly uniform over thousands of cells
        self.log_sharpness = (
            nn.Parameter(torch.full((num_tags,), math.log(init_sharpness))) if init_sharpness != 1.0 else None
        )
        # Per-tag learned location prior (a coarse grid of score offsets, upsampled onto the map and
        # added to every scan's scores): after RAS reorientation and the foreground crop an organ sits
        # in about the same place in every scan, which content alone is slow to learn from tags.
        # It starts flat (no preference) and learns from the tag losses only; ``prior_gain`` scales
        # its learning rate (Adam steps are ~lr whatever the parameter's scale).
        self.prior_gain = float(prior_gain)
        # the prior describes where organs lie in a whole, foreground-cropped scan; a user of the head
        # on patches (the stage 2 segmenter) turns it off
        self.use_position_prior = True
        self.position_logits = None
        if position_prior is not None:
            grid = tuple(int(v) for v in position_prior)
            if len(grid) != spatial_dims or min(grid) < 1:
                raise ValueError(
                    f"position_prior={list(position_prior)} must be {spatial_dims} positive grid sizes"
                )
            self.position_logits = nn.Parameter(torch.zeros(num_tags, *grid))
        if not 0.0 <= mask_min_inside <= 1.0:
            raise ValueError(f"mask_min_inside={mask_min_inside} must be in [0, 1]")
        if mask_margin < 0:
            raise ValueError(f"mask_margin={mask_margin} must be >= 0")
        self.mask_min_inside = mask_min_inside
        self.mask_margin = mask_margin
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
        self.num_tags = num_tags
        self.num_outputs = num_outputs
        self.num_heads = num_heads
        self.dim = dim
        self.spatial_dims = spatial_dims

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
        """``[num_tags, *spatial]``: the learned location prior (``position_prior`` set) on a map of this size."""
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[self.spatial_dims]
        prior = F.interpolate(self.position_logits[None], size=tuple(spatial), mode=mode, align_corners=False)
        return prior[0] * self.prior_gain

    def _inside(self, mask: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        return _inside_cells(mask, spatial, self.mask_min_inside, self.mask_margin)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tag logits and pixel-tag attention maps.

        Args:
            features: ``[B, feature_dim, *spatial]``.
            mask: optional ``[B, 1, *mask_spatial]`` body mask (nonzero inside) at the map's or a
                finer (e.g. input) resolution; a map cell counts as inside when any voxel under it
                is inside (adaptive max pooling).

        Returns:
            ``logits [B, num_tags, num_outputs]`` and ``attn [B, num_tags, *spatial]``: per tag, the
            attention sums to 1 over the voxels inside the mask and is exactly 0 outside; a sample
            whose mask is empty gets all-zero attention and finite logits.
        """
        if features.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"features must be [B, C, *{self.spatial_dims} spatial dims], got {tuple(features.shape)}"
            )
        b, _, *spatial = features.shape
        tokens = self.feature_norm(self.embed(features).flatten(2).transpose(1, 2))  # [B, N, dim]
        h, d = self.num_heads, self.dim // self.num_heads
        k = self.to_k(tokens).view(b, -1, h, d).transpose(1, 2)  # [B, h, N, d]
        if values is not None:
            tokens = self.value_norm(self.value_embed(values).flatten(2).transpose(1, 2))
        v = self.to_v(tokens).view(b, -1, h, d).transpose(1, 2)
        q = self.to_q(self.query_norm(self.queries)).view(-1, h, d).transpose(0, 1)  # [h, T, d]
        scores = torch.einsum("htd,bhnd->bhtn", q, k) / math.sqrt(d)  # [B, h, T, N]
        if self.log_sharpness is not None:
            scores = scores * self.log_sharpness.exp()[None, None, :, None]
        if self.position_logits is not None and self.use_position_prior:
            scores = scores + self.position_scores(spatial).flatten(1)[None, None]

        if mask is not None:
            inside = self._inside(mask, spatial).unsqueeze(1)  # [B, 1, 1, N]
            # A finite fill (not -inf) keeps an all-masked row finite in forward and backward;
            # multiplying by the mask afterwards makes the outside exactly zero.
            scores = scores.masked_fill(~inside, torch.finfo(scores.dtype).min)
            attn = F.softmax(scores, dim=-1) * inside.to(scores.dtype)
        else:
            attn = F.softmax(scores, dim=-1)

        attended = torch.einsum("bhtn,bhnd->bthd", attn, v).reshape(b, self.num_tags, self.dim)
        # Class-specific residual attention (CSRA, Zhu & Wu, ICCV 2021): the attended feature is added
        # to the body-average feature. The average path learns as fast as global pooling (and, over
        # local values, measures how much of the body looks like the organ: its size); the attention
        # path must find the voxels whose own features carry the finding.
        values = v.transpose(1, 2).reshape(b, -1, self.dim)  # [B, N, dim]
        if mask is not None:
            weight = inside.reshape(b, -1, 1).to(values.dtype)
            average = (values * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        else:
            average = values.mean(1)
        pooled = self.out_norm(attended)
        if self.residual_average:
            pooled = pooled + self.out_norm(average).unsqueeze(1)
        logits = torch.einsum("btd,tdk->btk", pooled, self.head_weight) + self.head_bias
        return logits, attn.mean(dim=1).view(b, self.num_tags, *spatial)


def _inside_cells(
    mask: torch.Tensor, spatial: Sequence[int], min_inside: float, margin: int = 0
) -> torch.Tensor:
    """``[B, 1, N]`` bool: map cells the attention may look at.

    ``min_inside == 0``: a cell counts when any voxel under it is inside the mask. Otherwise at least
    that share of its voxels must be inside: with 1.0, cells on the body's outline (half air, half
    skin) are out of reach, so the outline (which gives position away) cannot be a shortcut.
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


class TopDownFusion(nn.Module):
    """FPN-style top-down pathway (Lin et al., "Feature Pyramid Networks", CVPR 2017) ending at one level.

    1×1 lateral convolutions bring ``feature_channels[level:]`` to ``out_channels``; from the deepest
    up, each is upsampled (linear interpolation) to the next finer level and added. FPN's 3×3 output
    convolution is left out: 1×1 convolutions need no padding, so no border cue is added.
    """

    def __init__(
        self, spatial_dims: int, feature_channels: Sequence[int], level: int, out_channels: int
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={spatial_dims} must be 2 or 3")
        if not 0 <= level < len(feature_channels):
            raise ValueError(f"level={level} is out of range for {len(feature_channels)} feature levels")
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.level = level
        self.mode = {2: "bilinear", 3: "trilinear"}[spatial_dims]
        self.lateral = nn.ModuleList(conv(c, out_channels, kernel_size=1) for c in feature_channels[level:])

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        levels = features[self.level :]
        fused = self.lateral[-1](levels[-1])
        for lateral, f in zip(reversed(self.lateral[:-1]), reversed(levels[:-1]), strict=True):
            up = F.interpolate(fused, size=f.shape[2:], mode=self.mode, align_corners=False)
            fused = lateral(f) + up
        return fused


class TagAttentionHead(nn.Module):
    """What stage 1 adds on top of an encoder's feature pyramid to recognise organ tags: optional
    top-down fusion of the deeper levels into level ``attn_level``, then :class:`PixelTagAttention`.

    Stage 2 rebuilds it with ``TagAttentionHead(**head_config())`` and the exported weights to feed
    the pixel-tag attention maps to a segmentation decoder (MOSMOS transfer).

    Args:
        feature_channels: channels of the encoder's feature maps, high resolution first.
        num_tags: number of tags.
        attn_level: the level the attention reads.
        dim: attention width (and fused channels).
        num_outputs: logits per tag.
        fuse_levels: fuse ``feature_channels[attn_level + 1:]`` into the attention level.
        num_heads: attention heads.
        spatial_dims: 2 or 3.
        query_init: optional ``[num_tags, text_dim]`` initial queries (not part of the config: the
            trained queries are in the weights).
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        num_tags: int,
        attn_level: int,
        dim: int = 128,
        num_outputs: int = 2,
        fuse_levels: bool = True,
        num_heads: int = 1,
        spatial_dims: int = 3,
        query_init: torch.Tensor | None = None,
        value_source: str = "level0",
        in_channels: int = 1,
        attn_stride: int = 4,
        mask_min_inside: float = 0.0,
        mask_margin: int = 0,
        residual_average: bool = True,
        init_sharpness: float = 1.0,
        position_prior: Sequence[int] | None = None,
        prior_gain: float = 10.0,
    ) -> None:
        super().__init__()
        if value_source not in VALUE_SOURCES:
            raise ValueError(f"value_source={value_source!r} must be one of {VALUE_SOURCES}")
        if not 0 <= attn_level < len(feature_channels):
            raise ValueError(
                f"attn_level={attn_level} is out of range for {len(feature_channels)} feature levels"
            )
        self._config = {
            "feature_channels": [int(c) for c in feature_channels],
            "num_tags": num_tags,
            "attn_level": attn_level,
            "dim": dim,
            "num_outputs": num_outputs,
            "fuse_levels": fuse_levels,
            "num_heads": num_heads,
            "spatial_dims": spatial_dims,
            "value_source": value_source,
            "in_channels": in_channels,
            "attn_stride": attn_stride,
            "mask_min_inside": mask_min_inside,
            "mask_margin": mask_margin,
            "residual_average": residual_average,
            "init_sharpness": init_sharpness,
            "position_prior": None if position_prior is None else [int(v) for v in position_prior],
            "prior_gain": prior_gain,
        }
        self.value_source = value_source
        self.patch_embed = None
        self.attn_level = attn_level
        self.fusion = None
        channels = feature_channels[attn_level]
        value_dim = None
        if fuse_levels and attn_level < len(feature_channels) - 1:
            # Keys see the fused, context-rich map (where is the organ?), values only the level's own
            # features (what is there?): with fused values every voxel carries global context, and
            # the attention parked on the body wall instead of the organ.
            self.fusion = TopDownFusion(spatial_dims, feature_channels, attn_level, dim)
            value_dim, channels = feature_channels[0], dim
            if value_source == "patch":
                # Values are patch embeddings of the input itself (ViT-style, no context at all): a
                # cell's value then describes only that cell, so a finding can be read only where it is.
                conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
                self.patch_embed = conv(in_channels, dim, kernel_size=attn_stride, stride=attn_stride)
                value_dim = dim
        self.pixel_tag = PixelTagAttention(
            channels,
            num_tags,
            dim=dim,
            num_outputs=num_outputs,
            query_init=query_init,
            num_heads=num_heads,
            spatial_dims=spatial_dims,
            value_dim=value_dim,
            mask_min_inside=mask_min_inside,
            mask_margin=mask_margin,
            residual_average=residual_average,
            init_sharpness=init_sharpness,
            position_prior=position_prior,
            prior_gain=prior_gain,
        )

    def head_config(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this head."""
        return dict(self._config)

    def forward(
        self,
        features: Sequence[torch.Tensor],
        mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, T, K], attn [B, T, *spatial of level attn_level])`` from the encoder's feature maps."""
        if self.fusion is None:
            return self.pixel_tag(features[self.attn_level], mask)
        keys = self.fusion(features)
        if self.patch_embed is not None:
            if image is None:
                raise ValueError(
                    "value_source='patch' needs the input image: call head(features, mask, image)"
                )
            values = self.patch_embed(image)
            if tuple(values.shape[2:]) != tuple(keys.shape[2:]):
                values = F.interpolate(values, size=keys.shape[2:], mode="nearest")
            return self.pixel_tag(keys, mask, values=values)
        # Values from the finest level, pooled onto the attention grid: the smallest receptive field,
        # so that a voxel's value describes that voxel and not its neighbourhood (with wide-field
        # values the attention parked on the spine and read the organs from there). Max pooling
        # ("level0_max") keeps a finding smaller than a cell (a stone, a thrombus) at full strength,
        # where the average dilutes it by the cell's volume.
        pool = {
            ("level0", 5): F.adaptive_avg_pool3d,
            ("level0", 4): F.adaptive_avg_pool2d,
            ("level0_max", 5): F.adaptive_max_pool3d,
            ("level0_max", 4): F.adaptive_max_pool2d,
        }[(self.value_source, keys.ndim)]
        return self.pixel_tag(keys, mask, values=pool(features[0], keys.shape[2:]))
