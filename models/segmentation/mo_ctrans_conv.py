"""``mo_ctrans_conv``: a convolutional U-Net decoder whose every stage ends in (windowed) transformer
blocks that a fresh learned task token joins.

This was mosmos's ``mo_ctrans`` before the paper's decoder (:mod:`mosmos.models.segmentation.mo_ctrans`)
took that name; run directories written then are rebuilt as this variant (see
:func:`mosmos.finetune.inference.load_model`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.transformerblock import TransformerBlock
from torch import nn

from mosmos.models.encoders.base import ImageEncoder
from mosmos.models.registry import register_model
from mosmos.models.segmentation.common import num_heads_for, sinusoidal_position
from mosmos.models.segmentation.unet import _ACT, UNetSegmenter, resolve_encoder
from mosmos.models.tag_head import TagAttentionHead

__all__ = ["MOCTransConvSegmenter", "TaskTokenTransformer", "mo_ctrans_conv"]


class TaskTokenTransformer(nn.Module):
    """Transformer blocks over a feature map's voxel tokens with a learned task token prepended.

    The map ``[B, C, *S]`` becomes tokens; a grid of at most ``max_tokens`` cells is one sequence
    (full self-attention), a larger one is split into non-overlapping windows of ``window_size``
    cells per axis (``min(window_size, S_axis)``; the grid is zero-padded to whole windows and the
    padded keys masked). Every sequence (the whole grid or one window) gets a copy of the sample's
    task token in front, so every voxel attends to the task; the token is dropped after the blocks.
    Fixed sinusoidal codes of the position within the sequence's window are added to the voxel
    tokens (for full attention the window is the whole grid).

    Windows, as in Swin (Liu et al., ICCV 2021): full self-attention is quadratic in the tokens, and
    a fine stage (32x32x16 = 16384 tokens) would need a 16384^2 attention matrix per head. Within a
    window it is real self-attention (MONAI ``TransformerBlock``, with its key mask for the padding);
    the windows exchange information through the convolutions between stages.

    Args:
        spatial_dims: 2 or 3.
        dim: channels (token width).
        num_tasks: task tokens (``nn.Embedding(num_tasks, dim)``).
        depth: transformer blocks.
        num_heads: attention heads (divides ``dim``).
        mlp_ratio: MLP width relative to ``dim``.
        max_tokens: largest grid attended as a whole.
        window_size: window edge (cells) for larger grids.
        dropout: dropout in the blocks.
        layer_scale_init: initial per-channel scale of the transformer's update to the features.
    """

    def __init__(
        self,
        spatial_dims: int,
        dim: int,
        num_tasks: int,
        depth: int = 1,
        num_heads: int = 1,
        mlp_ratio: float = 2.0,
        max_tokens: int = 512,
        window_size: int = 4,
        dropout: float = 0.0,
        layer_scale_init: float = 0.1,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1 (the task token joins every stage)")
        if window_size < 1:
            raise ValueError(f"window_size={window_size} must be >= 1")
        if max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens} must be >= 0")
        self.spatial_dims = spatial_dims
        self.dim = dim
        self.max_tokens = max_tokens
        self.window_size = window_size
        self.task_token = nn.Embedding(num_tasks, dim)
        nn.init.trunc_normal_(self.task_token.weight, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim, max(1, int(dim * mlp_ratio)), num_heads, dropout_rate=dropout, qkv_bias=True
            )
            for _ in range(depth)
        )
        # LayerScale (Touvron et al., "Going deeper with image transformers", ICCV 2021): the
        # transformer's update enters the convolutional decoder's features scaled by a small learned
        # per-channel factor, so the decoder starts close to a U-Net and learns as fast as one (at
        # scale 1 a CPU pilot's MO-CTranS reached half the U-Net's Dice in 400 steps).
        self.layer_scale = nn.Parameter(torch.full((dim,), layer_scale_init))
        for block in self.blocks:
            # MONAI builds this LayerNorm even without cross-attention and never uses it then; a
            # parameter without gradient would make DDP fail (unused parameters).
            block.norm_cross_attn = nn.Identity()

    def window_shape(self, size: Sequence[int]) -> tuple[int, ...]:
        """The attention window for a grid of ``size``: the grid itself when it has at most
        ``max_tokens`` cells, else ``min(window_size, s)`` per axis."""
        if math.prod(size) <= self.max_tokens:
            return tuple(size)
        return tuple(min(self.window_size, s) for s in size)

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """``x [B, C, *S]`` and ``task [B]`` (long) -> ``[B, C, *S]``."""
        b, c, *size = x.shape
        d = self.spatial_dims
        window = self.window_shape(size)
        padded = [math.ceil(s / w) * w for s, w in zip(size, window, strict=True)]
        pad = [p - s for s, p in zip(size, padded, strict=True)]
        if any(pad):
            # F.pad lists the last axis first: (last_lo, last_hi, ..., first_lo, first_hi).
            x = F.pad(x, [v for p in reversed(pad) for v in (0, p)])
        counts = [p // w for p, w in zip(padded, window, strict=True)]
        # [B, C, n0, w0, n1, w1, ...] -> [B, n0, n1, ..., w0, w1, ..., C] -> [B * nW, W, C]
        view = [b, c] + [v for n, w in zip(counts, window, strict=True) for v in (n, w)]
        perm = [0, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2), 1]
        n_win, n_tok = math.prod(counts), math.prod(window)
        tokens = x.reshape(view).permute(perm).reshape(b * n_win, n_tok, c)
        position = sinusoidal_position(window, c).to(tokens)
        task_tok = self.task_token(task).to(tokens.dtype).repeat_interleave(n_win, dim=0).unsqueeze(1)
        seq = torch.cat([task_tok, tokens + position], dim=1)
        attn_mask = None
        if any(pad):
            valid = torch.zeros(padded, dtype=torch.bool, device=x.device)
            valid[tuple(slice(0, s) for s in size)] = True
            win_view = [v for n, w in zip(counts, window, strict=True) for v in (n, w)]
            valid = valid.reshape(win_view).permute([*range(0, 2 * d, 2), *range(1, 2 * d, 2)])
            valid = valid.reshape(n_win, n_tok).repeat(b, 1)
            attn_mask = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        for block in self.blocks:
            seq = block(seq, attn_mask=attn_mask)
        # drop the task token; keep the blocks' update but not the position codes (added to the
        # features they would stay in the decoder's maps as a fixed pattern repeating every window)
        tokens = tokens + self.layer_scale * (seq[:, 1:] - tokens - position)
        inverse = [0, 2 * d + 1, *(v for i in range(d) for v in (1 + i, 1 + d + i))]
        out = tokens.reshape(b, *counts, *window, c).permute(inverse).reshape(b, c, *padded)
        if any(pad):
            out = out[(slice(None), slice(None), *(slice(0, s) for s in size))]
        return out


class MOCTransConvSegmenter(UNetSegmenter):
    """Multi-organ segmentation with task tokens in the style of MO-CTranS ("a CNN encoder and a
    Transformer decoder with task tokens for multi-organ segmentation from partially labelled
    datasets").

    The encoder is any :class:`ImageEncoder` (a CNN such as ``rescnn3d``); the decoder has the
    U-Net's topology (:class:`UNetSegmenter`: connected to the encoder at every resolution, optional
    full-resolution stem, MOSMOS attention maps on every skip) and ends every stage, including the
    bottleneck, in a :class:`TaskTokenTransformer`: a learned per-stage task token (one
    ``nn.Embedding(num_tasks, stage_channels)`` per stage) joins the self-attention over the stage's
    voxel tokens and is dropped before the next convolution or the output block. So one network
    serves datasets with different label sets, each task conditioning all of the decoder.

    Args:
        encoder, num_classes, attention_head, decoder_channels, stem_channels, norm, act, res_block,
            deep_supervision: as :class:`UNetSegmenter`.
        num_tasks: number of task tokens; ``task`` may be None only when it is 1.
        depth: transformer blocks per stage.
        head_dim: target width of an attention head (a stage gets ``channels // head_dim`` heads,
            at least 1, reduced until it divides the channels).
        mlp_ratio: transformer MLP width relative to the stage's channels.
        max_tokens: stages with more tokens use window attention.
        window_size: window edge in cells.
        dropout: dropout in the transformer blocks.
        transformer_stages: how many decoder points, from the bottleneck down, end in a transformer
            (None: all). Attention over the finest grids dominates the cost (windowed, it is still
            one sequence per window of every voxel). None: every point coarser than the input, i.e.
            all but the full-resolution stem stage, which stays convolutional (at full resolution
            attention cost 3x the rest of the network in a CPU profile at 64 x 64 x 48).
    """

    task_conditioned = True

    def __init__(
        self,
        encoder: ImageEncoder,
        num_classes: int,
        num_tasks: int = 1,
        attention_head: TagAttentionHead | None = None,
        decoder_channels: Sequence[int] | None = None,
        stem_channels: int | None = None,
        norm: str | tuple = "instance",
        act: str | tuple = _ACT,
        res_block: bool = True,
        depth: int = 1,
        head_dim: int = 32,
        mlp_ratio: float = 2.0,
        max_tokens: int = 512,
        window_size: int = 4,
        dropout: float = 0.0,
        transformer_stages: int | None = None,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__(
            encoder,
            num_classes,
            num_tasks,
            attention_head,
            decoder_channels=decoder_channels,
            stem_channels=stem_channels,
            norm=norm,
            act=act,
            res_block=res_block,
            deep_supervision=deep_supervision,
        )
        if head_dim < 1:
            raise ValueError(f"head_dim={head_dim} must be >= 1")
        self._decoder_config.update(
            {
                "depth": depth,
                "head_dim": head_dim,
                "mlp_ratio": mlp_ratio,
                "max_tokens": max_tokens,
                "window_size": window_size,
                "dropout": dropout,
                "transformer_stages": transformer_stages,
            }
        )
        n_points = len(self.stage_channels)
        if transformer_stages is not None and not 1 <= transformer_stages <= n_points:
            raise ValueError(f"transformer_stages={transformer_stages} must be in 1..{n_points} or None")
        default = n_points - 1 if self.has_stem else n_points  # every point coarser than the input
        self.transformer_stages = default if transformer_stages is None else transformer_stages
        self.transformers = nn.ModuleList(
            TaskTokenTransformer(
                self.spatial_dims,
                c,
                num_tasks,
                depth=depth,
                num_heads=num_heads_for(c, head_dim),
                mlp_ratio=mlp_ratio,
                max_tokens=max_tokens,
                window_size=window_size,
                dropout=dropout,
            )
            for c in self.stage_channels[: self.transformer_stages]
        )

    def task_ids_for(self, task: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return self.task_ids(task, x.shape[0], x.device)

    def refine(self, index: int, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        if index >= self.transformer_stages:  # finer stages: convolutions only (see transformer_stages)
            return x
        return self.transformers[index](x, task)


@register_model("segmenter", "mo_ctrans_conv")
def mo_ctrans_conv(
    encoder: ImageEncoder | str | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MOCTransConvSegmenter:
    """Convolutional MO-CTranS-style segmenter (see :class:`MOCTransConvSegmenter`); ``encoder`` a module or a
    registered name (default ``rescnn3d``, built with ``encoder_kwargs``)."""
    return MOCTransConvSegmenter(resolve_encoder(encoder, encoder_kwargs, "rescnn3d"), **kwargs)
