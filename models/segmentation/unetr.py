"""UNETR decoder (MONAI blocks) over any encoder's hidden states: a plain ViT's (all at one stride)
or a multi-scale encoder's (each level at its own stride)."""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.blocks import Convolution, UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from mosmos.models.encoders.base import ImageEncoder
from mosmos.models.registry import register_model
from mosmos.models.segmentation.common import SegmenterBase, decoder_strides
from mosmos.models.segmentation.unet import resolve_encoder
from mosmos.models.tag_head import TagAttentionHead

__all__ = ["UNETRSegmenter", "unetr", "unetr_stage_strides"]


def unetr_stage_strides(feature_strides: list[int]) -> list[int]:
    """Stride of the decoder stage each encoder level ``0 .. L-2`` feeds (the deepest level is the
    bottleneck at its own stride).

    Going from the deepest stage down, each stage halves the next coarser one's stride, but never
    exceeds the level's own stride (a level is only ever up-sampled) and never falls below 1. A
    ViT (strides ``[16] * 4``) gives ``[2, 4, 8]`` as in UNETR; ``rescnn3d`` with ``[2, 4, 8, 16]``
    gives ``[2, 4, 8]`` (no up-sampling of the skips); ``[1, 2, 4, 8]`` gives ``[1, 2, 4]``.

    Raises:
        ValueError: if a level's stride is not a multiple of its stage's, or neighbouring stages'
            strides do not divide.
    """
    strides = [int(s) for s in feature_strides]
    stages: list[int] = []
    coarser = strides[-1]
    for s in reversed(strides[:-1]):
        stage = min(s, max(1, coarser // 2))
        if s % stage or coarser % stage:
            raise ValueError(
                f"feature_strides={strides}: cannot place a UNETR decoder stage for a level at stride {s} "
                f"below a stage at stride {coarser}"
            )
        stages.insert(0, stage)
        coarser = stage
    return stages


class UNETRSegmenter(SegmenterBase):
    """UNETR (Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation", WACV 2022)
    decoder built from MONAI's ``UnetrBasicBlock``, ``UnetrPrUpBlock``, ``UnetrUpBlock`` and
    ``UnetOutBlock``.

    The encoder's deepest map is the bottleneck. Every other level ``i`` is brought from its own
    stride to its decoder stage's stride (:func:`unetr_stage_strides`) with ``feature_size *
    2**(i+1)`` channels: a ``UnetrPrUpBlock`` (transposed convolutions by 2, or by the whole factor
    when it is not a power of 2) or, when no up-sampling is needed, a ``UnetrBasicBlock``. A
    ``UnetrBasicBlock`` on the raw input is the full-resolution skip. From the bottleneck up, each
    ``UnetrUpBlock`` up-samples and fuses the next skip. With a ViT encoder (``vit3d``: four hidden
    states at stride 16) this is UNETR exactly; with a multi-scale encoder (``rescnn3d``) the skips
    are its levels.

    MOSMOS transfer: with an attention head, each skip is concatenated with the rescaled attention
    maps and brought back to the skip's width by a 1x1 MONAI ``Convolution`` (hand-added because
    ``UnetrUpBlock`` needs a skip of exactly its output width).

    ``task`` is accepted for a uniform interface and ignored.

    Args:
        encoder: the image encoder (``vit3d`` / ``vit2d`` by default in the factory).
        num_classes: output channels.
        num_tasks: recorded in the config; unused by this decoder.
        attention_head: optional stage 1 tag head.
        feature_size: channels of the full-resolution stage (UNETR's ``feature_size``).
        norm: MONAI norm name.
        conv_block: convolution blocks inside ``UnetrPrUpBlock`` (UNETR's default).
        res_block: residual blocks (UNETR's default).
    """

    def __init__(
        self,
        encoder: ImageEncoder,
        num_classes: int,
        num_tasks: int = 1,
        attention_head: TagAttentionHead | None = None,
        feature_size: int = 16,
        norm: str | tuple = "instance",
        conv_block: bool = True,
        res_block: bool = True,
    ) -> None:
        super().__init__(encoder, num_classes, num_tasks, attention_head)
        if feature_size < 1:
            raise ValueError(f"feature_size={feature_size} must be >= 1")
        decoder_strides(encoder.feature_strides)  # validates non-decreasing, dividing strides
        self._decoder_config = {
            "feature_size": feature_size,
            "norm": norm,
            "conv_block": conv_block,
            "res_block": res_block,
        }
        sd, fs, t = self.spatial_dims, feature_size, self.num_map_channels
        strides = list(encoder.feature_strides)
        channels = list(encoder.feature_channels)
        levels = len(strides)
        self.stage_strides = unetr_stage_strides(strides)
        stage_channels = [fs * 2 ** (i + 1) for i in range(levels - 1)]

        self.stem = UnetrBasicBlock(sd, self.in_channels, fs, 3, 1, norm_name=norm, res_block=res_block)
        self.skips = nn.ModuleList()
        for i in range(levels - 1):
            factor = strides[i] // self.stage_strides[i]
            if factor == 1:
                skip: nn.Module = UnetrBasicBlock(
                    sd, channels[i], stage_channels[i], 3, 1, norm_name=norm, res_block=res_block
                )
            else:
                power = int(math.log2(factor))
                by_two = 2**power == factor
                skip = UnetrPrUpBlock(
                    sd,
                    channels[i],
                    stage_channels[i],
                    num_layer=power - 1 if by_two else 0,
                    kernel_size=3,
                    stride=1,
                    upsample_kernel_size=2 if by_two else factor,
                    norm_name=norm,
                    conv_block=conv_block,
                    res_block=res_block,
                )
            self.skips.append(skip)
        # ups[i] ends at stage i (i = 0 .. L-2), run deepest first; final_up ends at full resolution.
        coarser_stride = [*self.stage_strides[1:], strides[-1]]
        coarser_channels = [*stage_channels[1:], channels[-1]]
        self.ups = nn.ModuleList(
            UnetrUpBlock(
                sd,
                coarser_channels[i],
                stage_channels[i],
                kernel_size=3,
                upsample_kernel_size=coarser_stride[i] // self.stage_strides[i],
                norm_name=norm,
                res_block=res_block,
            )
            for i in range(levels - 1)
        )
        first_stride = self.stage_strides[0] if levels > 1 else strides[0]
        first_channels = stage_channels[0] if levels > 1 else channels[0]
        self.final_up = UnetrUpBlock(
            sd,
            first_channels,
            fs,
            kernel_size=3,
            upsample_kernel_size=first_stride,
            norm_name=norm,
            res_block=res_block,
        )
        self.map_fusion: nn.ModuleList | None = None
        if t:
            self.map_fusion = nn.ModuleList(
                Convolution(sd, c + t, c, kernel_size=1, conv_only=True) for c in [*stage_channels, fs]
            )
        self.out = UnetOutBlock(sd, fs, num_classes)

    def _fuse(self, index: int, skip: torch.Tensor, maps: torch.Tensor | None) -> torch.Tensor:
        if self.map_fusion is None:
            return skip
        return self.map_fusion[index](self.with_maps(skip, maps))

    def forward(
        self, x: torch.Tensor, task: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, num_classes, *x.shape[2:]]`` (``task`` ignored; ``mask`` goes to the head)."""
        self.check_input(x)
        features, maps = self.encode(x, mask)
        y = features[-1]
        for i in reversed(range(len(self.ups))):
            y = self.ups[i](y, self._fuse(i, self.skips[i](features[i]), maps))
        y = self.final_up(y, self._fuse(len(self.ups), self.stem(x), maps))
        return self.out(y)


@register_model("segmenter", "unetr")
def unetr(
    encoder: ImageEncoder | str | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> UNETRSegmenter:
    """UNETR segmenter (see :class:`UNETRSegmenter`); ``encoder`` a module or a registered name
    (default ``vit3d``, built with ``encoder_kwargs``, e.g. ``{"img_size": [96, 96, 96]}``)."""
    return UNETRSegmenter(resolve_encoder(encoder, encoder_kwargs, "vit3d"), **kwargs)
