"""MO-CTranS (Gong et al., "MO-CTranS: A unified multi-organ segmentation model learning from
multiple heterogeneously labelled datasets", arXiv:2503.22557): a CNN encoder, and a Transformer
decoder over one token grid that a learned task token joins once."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import UnetOutBlock
from monai.networks.blocks.dynunet_block import UnetBasicBlock
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.layers.factories import Conv
from torch import nn

from mosmos.models.encoders.base import ImageEncoder
from mosmos.models.registry import register_model
from mosmos.models.segmentation.common import (
    SegmenterBase,
    UpStage,
    decoder_strides,
    num_heads_for,
    sinusoidal_position,
)
from mosmos.models.segmentation.unet import _ACT, resolve_encoder
from mosmos.models.tag_head import TagAttentionHead

__all__ = ["MOCTransSegmenter", "default_voxel_channels", "depth_to_space", "mo_ctrans", "space_to_depth"]


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, C, *S]`` -> tokens ``[B, prod(S) / factor**d, C * factor**d]``: every ``factor``-sized
    block of voxels becomes one token (its channels, then its voxels in row-major order); tokens are
    in row-major order of the coarse grid ``S / factor``."""
    b, c, *size = x.shape
    d = len(size)
    grid = [s // factor for s in size]
    view = [b, c, *(v for n in grid for v in (n, factor))]
    # [B, C, n0, f, n1, f, ...] -> [B, n0, n1, ..., C, f, f, ...]
    perm = [0, *range(2, 2 + 2 * d, 2), 1, *range(3, 3 + 2 * d, 2)]
    return x.reshape(view).permute(perm).reshape(b, math.prod(grid), c * factor**d)


def depth_to_space(tokens: torch.Tensor, grid: Sequence[int], factor: int) -> torch.Tensor:
    """The inverse of :func:`space_to_depth`: tokens ``[B, prod(grid), C * factor**d]`` ->
    ``[B, C, *(g * factor for g in grid)]``."""
    b, _, width = tokens.shape
    d = len(grid)
    c = width // factor**d
    # [B, n0, n1, ..., C, f, f, ...] -> [B, C, n0, f, n1, f, ...]
    perm = [0, d + 1, *(v for i in range(d) for v in (1 + i, d + 2 + i))]
    x = tokens.reshape(b, *grid, c, *([factor] * d)).permute(perm)
    return x.reshape(b, c, *(g * factor for g in grid))


def default_voxel_channels(bottleneck_channels: int, folds: Sequence[int], spatial_dims: int) -> list[int]:
    """Channels each skip voxel keeps (bottleneck first) so that the token width doubles from
    stage to stage, as in the paper's 2D network (``d, 2d, 4d, ...``).

    Stage ``k`` folds blocks of ``folds[k] ** spatial_dims`` voxels into a token, so its voxel
    channels are ``bottleneck_channels * 2**k / folds[k] ** spatial_dims`` rounded, at least 2 (in
    2D with folds ``1, 2, 4, ...`` that is the paper's halving per level; in 3D a quarter per level).
    """
    return [max(2, round(bottleneck_channels * 2**k / f**spatial_dims)) for k, f in enumerate(folds)]


class MOCTransSegmenter(SegmenterBase):
    """MO-CTranS: a CNN encoder and a Transformer decoder with task tokens (Gong et al. 2025,
    arXiv:2503.22557, and the authors' public ``CTS_cond`` network). ``mo_ctrans`` in the registry
    and in configs means this network; the earlier convolutional decoder with a windowed
    transformer and a fresh token per stage is ``mo_ctrans_conv``.

    The decoder works on ONE token grid, the bottleneck's (input size / the encoder's total stride):

    1. every encoder level ``i`` (MOSMOS attention maps concatenated, when there is a tag head) is
       reduced per voxel to ``voxel_channels[k]`` channels (a 1x1 convolution, the paper's
       ``Linear(C_i, C_i / c0)``) and folded onto the grid by space-to-depth: each block of
       ``f = total_stride / stride_i`` voxels per axis becomes one token of width
       ``D_k = voxel_channels[k] * f**d``;
    2. stage 0 (the bottleneck): the grid's tokens, plus fixed sine-cosine position codes, and ONE
       learned task token (``nn.Embedding(num_tasks, D_0)``) appended after them run through
       ``depth`` pre-norm transformer blocks with global self-attention over the whole grid;
    3. stage ``k > 0``: a linear map widens every token, the task token included, from ``D_{k-1}`` to
       ``D_k``; the folded skip of the next finer level is added to the grid's tokens; ``depth``
       transformer blocks again attend over the grid and the task token;
    4. after the finest stage the task token is dropped, the grid is unfolded (depth-to-space) to
       the finest level's resolution, and a head shared by all tasks gives the logits: a 1x1
       convolution (MONAI ``UnetOutBlock``), preceded, when the encoder's finest level is below full
       resolution (``rescnn3d`` with strides ``[2, 2, 2, 2]``), by the U-Net's full-resolution stem
       stage (:class:`~mosmos.models.segmentation.common.UpStage` with a conv stem on the input).

    Departures from the authors' 2D code, each for 3D or for mosmos's interface: the stem stage
    just named (their encoder's first level is at full resolution; folding a full-resolution
    level onto a stride-16 grid in 3D would make 4096-voxel tokens); fixed sine-cosine position
    codes instead of a learned embedding of one image size (so any input divisible by the total
    stride works, and sliding windows of another size); the skip reduction is a 1x1 convolution
    (the same map as their per-voxel ``Linear``); MONAI's ``TransformerBlock`` (GELU MLP) instead
    of their ReLU MLP. Tasks are whatever the data layer numbers: in mosmos one per dataset (the
    paper's label set x view is a task id like any other).

    Args:
        encoder: the image encoder (strides each a multiple of the previous one).
        num_classes: output channels, shared by every task.
        num_tasks: task tokens; ``task`` may be None only when it is 1.
        attention_head: optional stage 1 tag head (MOSMOS transfer).
        voxel_channels: channels each skip voxel is reduced to before folding, one per encoder level,
            bottleneck first (default :func:`default_voxel_channels`: token widths doubling).
        depth: transformer blocks per stage (the paper's ``n_trans``).
        head_dim: target width of an attention head (the paper: ``base_channel``); a stage gets
            ``D_k // head_dim`` heads, at least 1, reduced until it divides ``D_k``.
        mlp_ratio: transformer MLP width relative to the token width (the paper: 2).
        dropout: dropout in the transformer blocks (the paper: 0.1).
        stem_channels: channels of the full-resolution stem stage (default the encoder's
            ``feature_channels[0]``); unused when the finest level is at full resolution.
        norm: MONAI norm name of the stem stage.
        act: MONAI activation of the stem stage.

    Example::

        encoder = create_image_encoder("rescnn3d", channels=(16, 32, 48, 64), strides=(2, 2, 2, 2))
        net = MOCTransSegmenter(encoder, num_classes=11, num_tasks=3)
        net(torch.randn(2, 1, 48, 48, 32), task=torch.tensor([0, 2])).shape  # [2, 11, 48, 48, 32]
    """

    task_conditioned = True

    def __init__(
        self,
        encoder: ImageEncoder,
        num_classes: int,
        num_tasks: int = 1,
        attention_head: TagAttentionHead | None = None,
        voxel_channels: Sequence[int] | None = None,
        depth: int = 1,
        head_dim: int = 32,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
        stem_channels: int | None = None,
        norm: str | tuple = "instance",
        act: str | tuple = _ACT,
    ) -> None:
        super().__init__(encoder, num_classes, num_tasks, attention_head)
        strides = [int(s) for s in encoder.feature_strides]
        decoder_strides(strides)  # each stride a multiple of the previous one
        levels, sd = len(strides), self.spatial_dims
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1 (the task token joins every stage)")
        if head_dim < 1:
            raise ValueError(f"head_dim={head_dim} must be >= 1")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={mlp_ratio} must be > 0")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        # stage k works at encoder level L-1-k; its voxel blocks are folds[k] voxels per axis
        self.folds = [self.total_stride // s for s in reversed(strides)]
        if voxel_channels is None:
            voxel_channels = default_voxel_channels(encoder.feature_channels[-1], self.folds, sd)
        voxel_channels = [int(c) for c in voxel_channels]
        if len(voxel_channels) != levels or min(voxel_channels) < 1:
            raise ValueError(
                f"voxel_channels={voxel_channels} must hold {levels} positive ints (one per encoder "
                "level, bottleneck first)"
            )
        stem_channels = int(stem_channels or encoder.feature_channels[0])
        self._decoder_config = {
            "voxel_channels": voxel_channels,
            "depth": depth,
            "head_dim": head_dim,
            "mlp_ratio": mlp_ratio,
            "dropout": dropout,
            "stem_channels": stem_channels,
            "norm": norm,
            "act": act,
        }
        self.voxel_channels = voxel_channels
        self.token_channels = [c * f**sd for c, f in zip(voxel_channels, self.folds, strict=True)]
        t = self.num_map_channels
        skip_in = [c + t for c in reversed(encoder.feature_channels)]
        self.reduce = nn.ModuleList(
            Conv[Conv.CONV, sd](skip_in[k], voxel_channels[k], kernel_size=1) for k in range(levels)
        )
        # one learned token per task, N(0, 1) like the authors' torch.randn tokens
        self.task_token = nn.Embedding(num_tasks, self.token_channels[0])
        self.widen = nn.ModuleList(
            nn.Linear(self.token_channels[k - 1], self.token_channels[k]) for k in range(1, levels)
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*(self._block(dim, head_dim, mlp_ratio, dropout) for _ in range(depth)))
            for dim in self.token_channels
        )
        self.has_stem = strides[0] > 1
        last = voxel_channels[-1]
        if self.has_stem:
            self.stem = UnetBasicBlock(
                sd, self.in_channels, stem_channels, kernel_size=3, stride=1, norm_name=norm, act_name=act
            )
            self.stem_stage = UpStage(
                sd, last, stem_channels + t, stem_channels, strides[0], norm=norm, act=act
            )
            last = stem_channels
        self.out = UnetOutBlock(sd, last, num_classes)

    @staticmethod
    def _block(dim: int, head_dim: int, mlp_ratio: float, dropout: float) -> TransformerBlock:
        block = TransformerBlock(
            dim,
            max(1, int(dim * mlp_ratio)),
            num_heads_for(dim, head_dim),
            dropout_rate=dropout,
            qkv_bias=True,
        )
        # MONAI builds this LayerNorm even without cross-attention and never uses it; a parameter
        # without a gradient would make DDP fail (unused parameters).
        block.norm_cross_attn = nn.Identity()
        return block

    def decode_tokens(
        self, features: list[torch.Tensor], maps: torch.Tensor | None, task: torch.Tensor
    ) -> torch.Tensor:
        """The decoder's token sequence after its last stage: ``[B, N + 1, D_last]``, the grid's
        ``N`` tokens (row-major) followed by the task token."""
        levels = len(features)
        skips = (
            space_to_depth(self.reduce[k](self.with_maps(features[levels - 1 - k], maps)), self.folds[k])
            for k in range(levels)
        )
        bottleneck = next(skips)
        position = sinusoidal_position(features[-1].shape[2:], bottleneck.shape[-1]).to(bottleneck)
        token = self.task_token(task).to(bottleneck.dtype).unsqueeze(1)
        seq = self.stages[0](torch.cat([bottleneck + position, token], dim=1))  # the token joins once
        for k, skip in enumerate(skips, start=1):
            seq = self.widen[k - 1](seq)  # the task token is widened with the grid
            seq = self.stages[k](torch.cat([seq[:, :-1] + skip, seq[:, -1:]], dim=1))
        return seq

    def forward(
        self, x: torch.Tensor, task: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, num_classes, *x.shape[2:]]``.

        Args:
            x: ``[B, in_channels, *spatial]``, each spatial size divisible by the encoder's total stride.
            task: ``[B]`` task ids in ``[0, num_tasks)`` (None only with one task).
            mask: optional ``[B, 1, *spatial]`` body mask, passed to the attention head.
        """
        self.check_input(x)
        task_ids = self.task_ids(task, x.shape[0], x.device)
        features, maps = self.encode(x, mask)
        seq = self.decode_tokens(features, maps, task_ids)
        # drop the task token, unfold the grid to the finest level's resolution, then the shared head
        y = depth_to_space(seq[:, :-1], features[-1].shape[2:], self.folds[-1])
        if self.has_stem:
            y = self.stem_stage(y, self.with_maps(self.stem(x), maps))
        return self.out(y)


@register_model("segmenter", "mo_ctrans")
def mo_ctrans(
    encoder: ImageEncoder | str | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MOCTransSegmenter:
    """MO-CTranS (see :class:`MOCTransSegmenter`); ``encoder`` a module or a registered name
    (default ``rescnn3d``, built with ``encoder_kwargs``)."""
    return MOCTransSegmenter(resolve_encoder(encoder, encoder_kwargs, "rescnn3d"), **kwargs)
