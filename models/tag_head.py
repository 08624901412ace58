"""The stage 1 tag head: its settings (:class:`TagHeadConfig`), the top-down fusion of the encoder's
levels, and :class:`TagAttentionHead`, which stage 1 trains and stage 2 rebuilds from the export.

The head has one method, with its tuned settings as defaults. An experiment with another head is a
subclass registered under its own name (as nnU-Net's trainer variants), not a switch in this one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mosmos.models.attention import POSITION_PRIOR_GAIN, PixelTagAttention
from mosmos.models.encoders.base import ImageEncoder

__all__ = ["MAX_ATTENTION_STRIDE", "TagAttentionHead", "TagHeadConfig", "TopDownFusion"]

#: Without a level set, the attention reads the coarsest level at most this many voxels apart, so
#: that its maps stay at >= 1/4 of the input resolution.
MAX_ATTENTION_STRIDE = 4


@dataclass
class TagHeadConfig:
    """Settings of the stage 1 tag head (``model.tag_head`` in the stage 1 config)."""

    dim: int = 128  # attention width, and channels of the fused keys
    # initial tag queries: the text encoder's embedding of each organ name, or random
    queries: Literal["text", "learned"] = "text"
    # encoder level the attention reads (index, high resolution first); null: the coarsest level
    # whose stride is at most 4 voxels
    level: int | None = None
    # cells per axis of a learned per-organ location prior (attention-score offsets, flat at the
    # start, upsampled onto the attention map); null: no prior
    position_prior: list[int] | None = field(default_factory=lambda: [8, 8, 4])
    # share of a map cell's voxels that must be inside the body for the attention to look there
    # (0: any voxel; 1: the whole cell, which keeps the body's outline, a position cue, out of reach)
    min_inside: float = 1.0
    margin: int = 1  # map cells within this many cells of the map's edge are out of the attention's reach

    def check(self) -> None:
        """Raise a ``ValueError`` that names the first invalid setting."""
        if self.dim < 1:
            raise ValueError(f"dim={self.dim} must be >= 1")
        if self.queries not in ("text", "learned"):
            raise ValueError(f"queries={self.queries!r} must be 'text' or 'learned'")
        if self.position_prior is not None and (not self.position_prior or min(self.position_prior) < 1):
            raise ValueError(f"position_prior={self.position_prior} must be positive grid sizes or null")
        if not 0.0 <= self.min_inside <= 1.0:
            raise ValueError(f"min_inside={self.min_inside} must be in [0, 1]")
        if self.margin < 0:
            raise ValueError(f"margin={self.margin} must be >= 0")

    def resolve(self, feature_strides: Sequence[int]) -> TagHeadConfig:
        """A copy whose ``level`` is an index into ``feature_strides`` (negative indices and None
        resolved).

        Raises:
            ValueError: when ``level`` is out of range, or None and no level has a stride <= 4.
        """
        n = len(feature_strides)
        level = self.level
        if level is None:
            fine = [i for i, s in enumerate(feature_strides) if s <= MAX_ATTENTION_STRIDE]
            if not fine:
                raise ValueError(
                    f"no feature level with stride <= {MAX_ATTENTION_STRIDE} (strides {list(feature_strides)}); "
                    f"set the tag head's level"
                )
            level = fine[-1]
        elif not -n <= level < n:
            raise ValueError(f"level={level} is out of range for {n} feature levels")
        return dataclasses.replace(self, level=level % n)


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
    """What stage 1 adds on top of an encoder's feature pyramid to recognise organ tags: top-down
    fusion of the deeper levels into level ``config.level``, then :class:`PixelTagAttention`.

    The keys see the fused, context-rich map (where is the organ?), the values only the finest
    encoder level averaged onto the attention grid (what is there?): with fused values every cell
    carries global context and the attention parked on the body wall instead of the organ. When the
    attention reads the deepest level there is nothing to fuse, and keys and values are that level.

    Stage 2 rebuilds it with :meth:`from_config` (:meth:`head_config` is what the export records)
    and the exported weights, to feed the pixel-tag attention maps to a segmentation decoder.

    Args:
        feature_channels: channels of the encoder's feature maps, high resolution first.
        num_tags: number of tags.
        config: the head's settings; ``config.level`` must be resolved (an index: see
            :meth:`TagHeadConfig.resolve`, or build with :meth:`for_encoder`).
        spatial_dims: 2 or 3.
        num_outputs: logits per tag.
        query_init: optional ``[num_tags, text_dim]`` initial queries (not part of the config: the
            trained queries are in the weights).

    Example::

        head = TagAttentionHead.for_encoder(encoder, num_tags=11, config=TagHeadConfig(dim=64))
        logits, attn = head(encoder.forward_features(image), body_mask)  # [B, 11, 2], [B, 11, *map]
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        num_tags: int,
        config: TagHeadConfig,
        *,
        spatial_dims: int = 3,
        num_outputs: int = 2,
        query_init: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        config.check()
        if config.level is None or not 0 <= config.level < len(feature_channels):
            raise ValueError(
                f"level={config.level} must index one of {len(feature_channels)} feature levels "
                f"(TagHeadConfig.resolve(feature_strides) picks the default)"
            )
        prior = None if config.position_prior is None else [int(v) for v in config.position_prior]
        self.config = dataclasses.replace(config, position_prior=prior)
        self.feature_channels = [int(c) for c in feature_channels]
        self.num_tags = num_tags
        self.spatial_dims = spatial_dims
        self.num_outputs = num_outputs
        self.level = config.level
        self.fusion = None
        channels, value_dim = feature_channels[self.level], None
        if self.level < len(feature_channels) - 1:
            self.fusion = TopDownFusion(spatial_dims, feature_channels, self.level, config.dim)
            channels, value_dim = config.dim, feature_channels[0]
        self.pixel_tag = PixelTagAttention(
            channels,
            num_tags,
            dim=config.dim,
            num_outputs=num_outputs,
            query_init=query_init,
            spatial_dims=spatial_dims,
            value_dim=value_dim,
            min_inside=config.min_inside,
            margin=config.margin,
            position_prior=prior,
        )

    @classmethod
    def for_encoder(
        cls,
        encoder: ImageEncoder,
        num_tags: int,
        config: TagHeadConfig | None = None,
        *,
        num_outputs: int = 2,
        query_init: torch.Tensor | None = None,
    ) -> TagAttentionHead:
        """A head over ``encoder``'s feature pyramid, its level resolved from the encoder's strides."""
        return cls(
            encoder.feature_channels,
            num_tags,
            (config or TagHeadConfig()).resolve(encoder.feature_strides),
            spatial_dims=encoder.spatial_dims,
            num_outputs=num_outputs,
            query_init=query_init,
        )

    def head_config(self) -> dict[str, Any]:
        """What rebuilds this head with :meth:`from_config` (recorded in ``encoder.json``)."""
        return {
            "feature_channels": list(self.feature_channels),
            "num_tags": self.num_tags,
            "spatial_dims": self.spatial_dims,
            "num_outputs": self.num_outputs,
            "config": dataclasses.asdict(self.config),
        }

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> TagAttentionHead:
        """Rebuild a head from :meth:`head_config`'s record, or from the flat record of a head exported
        before the settings were pruned, when its settings are the behaviour that was kept.

        Raises:
            ValueError: for a record with unknown keys, or one that used a removed setting.
        """
        if "config" not in record:
            record = _from_flat_record(record)
        expected = {"feature_channels", "num_tags", "spatial_dims", "num_outputs", "config"}
        if set(record) != expected:
            raise ValueError(f"tag head record has keys {sorted(record)}, expected {sorted(expected)}")
        try:
            config = TagHeadConfig(**record["config"])
        except TypeError as err:
            raise ValueError(f"tag head record: {err}") from None
        return cls(
            record["feature_channels"],
            int(record["num_tags"]),
            config,
            spatial_dims=int(record["spatial_dims"]),
            num_outputs=int(record["num_outputs"]),
        )

    def forward(
        self, features: Sequence[torch.Tensor], mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, T, K], attn [B, T, *spatial of level config.level])`` from the encoder's
        feature maps (high resolution first) and an optional body mask."""
        if self.fusion is None:
            return self.pixel_tag(features[self.level], mask)
        keys = self.fusion(features)
        # Values from the finest level, averaged onto the attention grid: the smallest receptive
        # field, so that a cell's value describes that cell and not its neighbourhood (with wide-field
        # values the attention parked on the spine and read the organs from there).
        pool = F.adaptive_avg_pool3d if keys.ndim == 5 else F.adaptive_avg_pool2d
        return self.pixel_tag(keys, mask, values=pool(features[0], keys.shape[2:]))


#: Settings of the flat records written before the head's settings were pruned (``TagAttentionHead(
#: **record)``): the value each must hold for this version to rebuild the same head (absent keys
#: held their constructor default), and the behaviour that was kept.
_PRUNED_SETTINGS = {
    "value_source": ("level0", "values are the finest level averaged onto the attention grid"),
    "residual_average": (False, "no body-average (CSRA) path: the attended values alone give the logits"),
    "init_sharpness": (1.0, "the attention starts flat, with no learned sharpness"),
    "prior_gain": (POSITION_PRIOR_GAIN, f"the location prior's gain is fixed at {POSITION_PRIOR_GAIN:g}"),
    "num_heads": (1, "one attention head"),
    "fuse_levels": (True, "the deeper levels are always fused into the keys"),
}
_FLAT_DEFAULTS = {
    "value_source": "level0",
    "residual_average": True,
    "init_sharpness": 1.0,
    "prior_gain": POSITION_PRIOR_GAIN,
    "num_heads": 1,
    "fuse_levels": True,
}


def _from_flat_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A pre-pruning flat record as :meth:`TagAttentionHead.head_config` writes it now, or a
    ``ValueError`` naming the removed setting the head was trained with."""
    missing = [k for k in ("feature_channels", "num_tags", "attn_level") if k not in record]
    if missing:
        raise ValueError(f"tag head record lacks {missing} (keys: {sorted(record)})")
    flat = {**_FLAT_DEFAULTS, **record}
    channels = list(flat["feature_channels"])
    level = flat["attn_level"]
    position_prior = flat.get("position_prior")
    for key, (kept, behaviour) in _PRUNED_SETTINGS.items():
        irrelevant = (key == "fuse_levels" and level == len(channels) - 1) or (
            key == "prior_gain" and position_prior is None
        )
        if flat[key] != kept and not irrelevant:
            raise ValueError(
                f"this tag head was trained with {key}={flat[key]!r}, a setting removed because it "
                f"measured no gain (now: {behaviour}); retrain stage 1, or use the mosmos version "
                f"that trained it"
            )
    known = {"feature_channels", "num_tags", "attn_level", "dim", "num_outputs", "spatial_dims"}
    known |= {"mask_min_inside", "mask_margin", "position_prior", "in_channels", "attn_stride"}
    unknown = sorted(set(record) - known - set(_PRUNED_SETTINGS))
    if unknown:
        raise ValueError(f"tag head record has unknown keys {unknown}")
    return {
        "feature_channels": channels,
        "num_tags": flat["num_tags"],
        "spatial_dims": flat.get("spatial_dims", 3),
        "num_outputs": flat.get("num_outputs", 2),
        "config": {
            "dim": flat.get("dim", 128),
            "level": level,
            "position_prior": position_prior,
            "min_inside": flat.get("mask_min_inside", 0.0),
            "margin": flat.get("mask_margin", 0),
        },
    }
