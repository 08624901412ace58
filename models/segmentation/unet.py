"""U-Net decoder over any :class:`ImageEncoder`: one skip connection per encoder level, plus a
full-resolution stem for encoders that start at a stride above 1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import UnetOutBlock
from monai.networks.blocks.dynunet_block import UnetBasicBlock
from torch import nn

from mosmos.models.encoders.base import ImageEncoder
from mosmos.models.registry import create_image_encoder, register_model
from mosmos.models.segmentation.common import SegmenterBase, UpStage, decoder_strides
from mosmos.models.tag_head import TagAttentionHead

__all__ = ["UNetSegmenter", "resolve_encoder", "unet"]

_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


class UNetSegmenter(SegmenterBase):
    """U-Net (Ronneberger et al., "U-Net", MICCAI 2015) decoder with MONAI blocks over a pretrained
    encoder's feature pyramid.

    From the deepest level (the bottleneck) up, each stage up-samples to the next finer encoder level
    and fuses it as a skip (:class:`~mosmos.models.segmentation.common.UpStage`). When the encoder's finest
    level is below full resolution (stride > 1, e.g. ``rescnn3d`` with strides ``[2, 2, 2, 2]``), a
    small stem (a MONAI ``UnetBasicBlock`` on the raw input) provides the last, full-resolution skip;
    with strides like ``[1, 2, 2, 2]`` level 0 is already full resolution and there is no stem. A
    MONAI ``UnetOutBlock`` (1x1 convolution) gives the logits.

    Deep supervision (nnU-Net's, as MultiTalent trains): with ``deep_supervision=True`` every decoder
    stage but the final and the coarsest gets its own 1x1 output block (``ds_heads``), and
    ``forward(..., intermediates=True)`` returns the logits at every such resolution, finest first
    (the coarsest stage gets no head: nnU-Net gives its output a loss weight of 0). A plain
    ``forward`` (validation, inference) returns the final logits only and never runs the extra heads.

    With an attention head, every skip (encoder levels and stem) gets the rescaled pixel-tag
    attention maps as extra channels (see :class:`SegmenterBase`).

    ``task`` is accepted for a uniform interface and ignored: one decoder serves every task (datasets
    differ only in which output channels their labels supervise).

    Args:
        encoder: the image encoder (strides each a multiple of the previous one).
        num_classes: output channels.
        num_tasks: recorded in the config; unused by this decoder.
        attention_head: optional stage 1 tag head (MOSMOS transfer).
        decoder_channels: output channels of the stage ending at each encoder level ``0 ..
            L-2`` (high resolution first); default the encoder's ``feature_channels[:-1]``.
        stem_channels: channels of the stem and of the full-resolution stage (default
            ``feature_channels[0]``); unused without a stem.
        norm: MONAI norm name.
        act: MONAI activation name or ``(name, kwargs)``.
        res_block: residual conv blocks in the stages (else plain double convolutions).
        deep_supervision: build the extra output blocks for ``forward(..., intermediates=True)``.

    Example::

        encoder = create_image_encoder("rescnn3d", channels=(8, 16, 16, 24), strides=(2, 2, 2, 2))
        net = UNetSegmenter(encoder, num_classes=4)
        net(torch.randn(2, 1, 32, 32, 16)).shape  # [2, 4, 32, 32, 16]
    """

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
        deep_supervision: bool = False,
    ) -> None:
        super().__init__(encoder, num_classes, num_tasks, attention_head)
        levels = len(encoder.feature_channels)
        factors, stem_factor = decoder_strides(encoder.feature_strides)
        if decoder_channels is None:
            decoder_channels = list(encoder.feature_channels[:-1])
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) != levels - 1 or any(c < 1 for c in decoder_channels):
            raise ValueError(
                f"decoder_channels={decoder_channels} must hold {levels - 1} positive ints "
                f"(one per encoder level but the deepest)"
            )
        stem_channels = int(stem_channels or encoder.feature_channels[0])
        self._decoder_config = {
            "decoder_channels": decoder_channels,
            "stem_channels": stem_channels,
            "norm": norm,
            "act": act,
            "res_block": res_block,
        }
        if deep_supervision:  # recorded only when on: older model.json files rebuild unchanged
            self._decoder_config["deep_supervision"] = True
        t, sd = self.num_map_channels, self.spatial_dims
        # stages[i] ends at encoder level i (i = 0 .. L-2); run deepest first.
        self.stages = nn.ModuleList(
            UpStage(
                sd,
                in_channels=[*decoder_channels, encoder.feature_channels[-1]][i + 1],
                skip_channels=encoder.feature_channels[i] + t,
                out_channels=decoder_channels[i],
                factor=factors[i],
                norm=norm,
                act=act,
                res_block=res_block,
            )
            for i in range(levels - 1)
        )
        self.has_stem = stem_factor > 1
        last = decoder_channels[0] if levels > 1 else encoder.feature_channels[0]
        if self.has_stem:
            self.stem = UnetBasicBlock(
                sd, self.in_channels, stem_channels, kernel_size=3, stride=1, norm_name=norm, act_name=act
            )
            self.stem_stage = UpStage(
                sd,
                last,
                stem_channels + t,
                stem_channels,
                stem_factor,
                norm=norm,
                act=act,
                res_block=res_block,
            )
            last = stem_channels
        self.out = UnetOutBlock(sd, last, num_classes)
        # auxiliary heads on the outputs of stages[0 .. L-3] (finest first) when there is a stem, or
        # of stages[1 .. L-3] when stages[0] is the final stage; never on the coarsest stage
        aux = list(range(0 if self.has_stem else 1, levels - 2))
        self.ds_levels = aux if deep_supervision else []
        self.ds_heads = nn.ModuleList(
            UnetOutBlock(sd, decoder_channels[i], num_classes) for i in self.ds_levels
        )
        # Channels of each refinement point in decoder order (bottleneck, levels L-2 .. 0, stem),
        # for subclasses that add blocks there (MO-CTranS).
        self.stage_channels = [encoder.feature_channels[-1], *reversed(decoder_channels)]
        if self.has_stem:
            self.stage_channels.append(stem_channels)

    def refine(self, index: int, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Hook after decoder point ``index`` (0: bottleneck, then each stage, finest last); identity."""
        return x

    def forward(
        self,
        x: torch.Tensor,
        task: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        intermediates: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Logits ``[B, num_classes, *x.shape[2:]]``.

        Args:
            x: ``[B, in_channels, *spatial]``, each spatial size divisible by the encoder's total stride.
            task: ``[B]`` task ids (see the class docstring for whether they are used).
            mask: optional ``[B, 1, *spatial]`` body mask, passed to the attention head.
            intermediates: deep supervision: return a list, the final logits then those of each
                supervised coarser stage (finest first); needs ``deep_supervision=True``.
        """
        if intermediates and not self.ds_heads:
            raise ValueError(f"{type(self).__name__}: intermediates=True needs deep_supervision=True")
        self.check_input(x)
        task_ids = self.task_ids_for(task, x)
        features, maps = self.encode(x, mask)
        y = self.refine(0, features[-1], task_ids)
        stage_out: dict[int, torch.Tensor] = {}
        for k, i in enumerate(reversed(range(len(self.stages))), start=1):
            y = self.refine(k, self.stages[i](y, self.with_maps(features[i], maps)), task_ids)
            stage_out[i] = y
        if self.has_stem:
            y = self.stem_stage(y, self.with_maps(self.stem(x), maps))
            y = self.refine(len(self.stages) + 1, y, task_ids)
        if not intermediates:
            return self.out(y)
        return [
            self.out(y),
            *(head(stage_out[i]) for i, head in zip(self.ds_levels, self.ds_heads, strict=True)),
        ]

    def task_ids_for(self, task: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Task ids as the decoder needs them; the plain U-Net ignores them (zeros)."""
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)


def resolve_encoder(
    encoder: ImageEncoder | str | None, encoder_kwargs: dict[str, Any] | None, default: str
) -> ImageEncoder:
    """An encoder given as a module, or built from the registry by name (``default`` when None)."""
    if isinstance(encoder, nn.Module):
        if encoder_kwargs:
            raise ValueError("encoder_kwargs is only used when the encoder is given by name")
        return encoder
    return create_image_encoder(encoder or default, **(encoder_kwargs or {}))


@register_model("segmenter", "unet")
def unet(
    encoder: ImageEncoder | str | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> UNetSegmenter:
    """U-Net segmenter (see :class:`UNetSegmenter`); ``encoder`` a module or a registered name
    (default ``rescnn3d``, built with ``encoder_kwargs``)."""
    return UNetSegmenter(resolve_encoder(encoder, encoder_kwargs, "rescnn3d"), **kwargs)
