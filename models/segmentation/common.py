"""What every segmenter shares: the encoder and optional tag head, input and task checks, the
MOSMOS attention-map transfer, parameter groups, and the skip-connection up-sampling stage."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock, get_conv_layer
from torch import nn

from mosmos.models.encoders.base import ImageEncoder
from mosmos.models.tag_head import TagAttentionHead

__all__ = [
    "ENCODER_PREFIXES",
    "HEAD_PARAMETERS_WITHOUT_MAPS",
    "TASK_SPECIFIC",
    "SegmenterBase",
    "UpStage",
    "decoder_strides",
    "freeze_unused_head_parameters",
    "num_heads_for",
    "sinusoidal_position",
]

#: Parameter-name prefixes of the pretrained part of every segmenter (the stage 1 encoder and tag
#: head); a trainer gives them a lower learning rate (see :meth:`SegmenterBase.encoder_parameters`).
ENCODER_PREFIXES = ("encoder.", "attention_head.")

#: Names of the parameters tied to a run's output channels and tasks: the output block(s) (``out``,
#: the deep-supervision ``ds_heads``) and the task tokens. A whole-network transfer (MultiTalent,
#: Ulrich et al. 2023) leaves them fresh and warms them up first.
TASK_SPECIFIC = re.compile(r"^(out|ds_heads)\.|(^|\.)task_token\.")


#: Parameters of a :class:`TagAttentionHead` that do not affect its attention maps (the value path
#: and the per-tag classifiers); a segmenter uses only the maps.
HEAD_PARAMETERS_WITHOUT_MAPS = (
    "pixel_tag.head_weight",
    "pixel_tag.head_bias",
    "pixel_tag.value_embed.",
    "pixel_tag.value_norm.",
    "pixel_tag.to_v.",
    "pixel_tag.out_norm.",
)


def freeze_unused_head_parameters(head: TagAttentionHead) -> list[str]:
    """Set ``requires_grad=False`` on the head's parameters that cannot affect its attention maps
    (:data:`HEAD_PARAMETERS_WITHOUT_MAPS`), turn off its location prior (if any: patches are not
    whole scans) and freeze it too, and return their names.

    The segmenter reads only the maps, so these parameters would never get a gradient: frozen, they
    stay out of the optimizer and do not trip DDP's unused-parameter check. They are still loaded
    from the stage 1 export, so the head's state dict keeps its stage 1 layout.
    """
    names = [n for n, _ in head.named_parameters() if n.startswith(HEAD_PARAMETERS_WITHOUT_MAPS)]
    if head.pixel_tag.position_logits is not None:
        # The location prior was learned on whole, foreground-cropped scans; a segmenter's input is a
        # patch anywhere in the body, where it would point the maps at the wrong place.
        head.pixel_tag.use_position_prior = False
        names.append("pixel_tag.position_logits")
    for n, p in head.named_parameters():
        if n in names:
            p.requires_grad_(False)
    return names


def decoder_strides(feature_strides: Sequence[int]) -> tuple[list[int], int]:
    """Per-level up-sampling factors of a skip-connection decoder over ``feature_strides``.

    Returns:
        ``factors`` with ``factors[i] = feature_strides[i + 1] // feature_strides[i]`` (the
        up-sampling from level ``i + 1`` to level ``i``), and ``stem_factor = feature_strides[0]``
        (from level 0 to the input resolution; 1 when the encoder's first level is at full resolution).

    Raises:
        ValueError: if the strides are not positive and each a multiple of the previous one.
    """
    strides = [int(s) for s in feature_strides]
    if not strides or strides[0] < 1:
        raise ValueError(f"feature_strides={strides} must be a non-empty list of positive ints")
    factors = []
    for fine, coarse in itertools.pairwise(strides):
        if coarse < fine or coarse % fine:
            raise ValueError(
                f"feature_strides={strides}: each stride must be a multiple of the previous one "
                f"({coarse} is not a multiple of {fine})"
            )
        factors.append(coarse // fine)
    return factors, strides[0]


class UpStage(nn.Module):
    """One decoder stage: transposed-convolution up-sampling by ``factor``, concatenation with the
    skip input, then a MONAI ``UnetResBlock`` (or ``UnetBasicBlock``).

    This is MONAI's ``UnetrUpBlock`` with the skip width decoupled from the output width: that block
    assumes a skip of exactly ``out_channels`` channels, whereas our skips are encoder levels of any
    width plus (MOSMOS transfer) one channel per organ tag. The parts are MONAI's own
    (``get_conv_layer`` with ``is_transposed=True``, ``UnetResBlock``). ``factor=1`` gives a
    point-wise (1x1) projection instead of an up-sampling, for encoders with equal neighbouring strides.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the coarser input.
        skip_channels: channels of the skip input (encoder level + attention maps).
        out_channels: output channels.
        factor: up-sampling factor (kernel size and stride of the transposed convolution).
        norm: MONAI norm name, e.g. ``"instance"``.
        act: MONAI activation name or ``(name, kwargs)``.
        res_block: residual block after the concatenation (else two plain convolutions).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        factor: int,
        norm: str | tuple = "instance",
        act: str | tuple = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        res_block: bool = True,
    ) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor={factor} must be >= 1")
        self.up = get_conv_layer(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=factor,
            stride=factor,
            conv_only=True,
            is_transposed=True,
        )
        block = UnetResBlock if res_block else UnetBasicBlock
        self.block = block(
            spatial_dims,
            out_channels + skip_channels,
            out_channels,
            kernel_size=3,
            stride=1,
            norm_name=norm,
            act_name=act,
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[2:] != skip.shape[2:]:
            raise ValueError(
                f"up-sampled map {tuple(x.shape[2:])} and skip {tuple(skip.shape[2:])} differ in size"
            )
        return self.block(torch.cat([x, skip], dim=1))


class SegmenterBase(nn.Module):
    """Base class of the segmenters: an :class:`ImageEncoder` (``self.encoder``), an optional stage 1
    :class:`TagAttentionHead` (``self.attention_head``) and a decoder defined by the subclass.

    ``forward(x, task=None, mask=None)`` returns logits ``[B, num_classes, *x.shape[2:]]`` (one
    channel per organ; the loss applies the sigmoid). Parameters are named ``encoder.*`` and
    ``attention_head.*`` like the stage 1 export's ``encoder.*`` / ``tag_attention.*`` keys.

    MOSMOS transfer (Tian et al., arXiv:2409.02418): with an attention head, its pixel-tag attention
    maps (one per organ tag, a softmax over the body's voxels) are rescaled per sample and tag to a
    maximum of 1, so that a voxel's value says how strongly the tag attends there relative to its
    peak rather than shrinking with the body's size, then resized to every decoder stage and
    concatenated to that stage's skip input (:meth:`maps_at`). The head's parameters that cannot
    affect its maps (value path, tag classifiers) are frozen (:func:`freeze_unused_head_parameters`).

    Args:
        encoder: the image encoder.
        num_classes: output channels (organs).
        num_tasks: number of tasks (datasets with their own label sets), for decoders that use it.
        attention_head: optional stage 1 tag head over ``encoder``'s features.

    Subclasses call ``super().__init__`` first, then record their decoder kwargs in
    ``self._decoder_config`` (see :meth:`decoder_config`).
    """

    #: whether the logits depend on ``task``: inference runs one pass per task only for such models
    task_conditioned: bool = False

    def __init__(
        self,
        encoder: ImageEncoder,
        num_classes: int,
        num_tasks: int = 1,
        attention_head: TagAttentionHead | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, ImageEncoder):
            raise TypeError(f"encoder must be an ImageEncoder, got {type(encoder).__name__}")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        if num_tasks < 1:
            raise ValueError(f"num_tasks={num_tasks} must be >= 1")
        if attention_head is not None:
            head_cfg = attention_head.head_config()
            if list(head_cfg["feature_channels"]) != list(encoder.feature_channels):
                raise ValueError(
                    f"attention_head was built for feature_channels={head_cfg['feature_channels']}, "
                    f"the encoder has {list(encoder.feature_channels)}"
                )
            if head_cfg["spatial_dims"] != encoder.spatial_dims:
                raise ValueError(
                    f"attention_head is {head_cfg['spatial_dims']}D, the encoder {encoder.spatial_dims}D"
                )
        self.encoder = encoder
        self.attention_head = attention_head
        if attention_head is not None:
            freeze_unused_head_parameters(attention_head)
        self.num_classes = int(num_classes)
        self.num_tasks = int(num_tasks)
        self.spatial_dims = encoder.spatial_dims
        self.in_channels = encoder.in_channels
        self.num_map_channels = 0 if attention_head is None else int(attention_head.head_config()["num_tags"])
        self.total_stride = max(encoder.feature_strides)
        self._interp = {2: "bilinear", 3: "trilinear"}[self.spatial_dims]
        self._decoder_config: dict[str, Any] = {}

    # -- configuration -------------------------------------------------------------------------

    def decoder_config(self) -> dict[str, Any]:
        """Constructor kwargs other than ``encoder`` and ``attention_head`` (``num_classes``,
        ``num_tasks`` and the decoder's own): ``type(m)(encoder, attention_head=head,
        **m.decoder_config())`` rebuilds the network."""
        return {"num_classes": self.num_classes, "num_tasks": self.num_tasks, **self._decoder_config}

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the network by name: the segmenter's registered name and
        :meth:`decoder_config`, the encoder's name and ``encoder_config()``, the head's config."""
        return {
            "name": getattr(self, "model_name", None),
            "decoder": self.decoder_config(),
            "encoder": {"name": getattr(self.encoder, "model_name", None), **self.encoder.encoder_config()},
            "attention_head": None if self.attention_head is None else self.attention_head.head_config(),
        }

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of the pretrained part (names starting with one of
        :data:`ENCODER_PREFIXES`), for a lower learning rate."""
        return (p for n, p in self.named_parameters() if n.startswith(ENCODER_PREFIXES) and p.requires_grad)

    def is_task_specific(self, name: str) -> bool:
        """Whether parameter (or buffer) ``name`` belongs to the output head(s) or a task token
        (:data:`TASK_SPECIFIC`): the parts a whole-network transfer does not carry over."""
        return TASK_SPECIFIC.search(name) is not None

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Every other trainable parameter (decoder, stem, task tokens, output block)."""
        return (
            p for n, p in self.named_parameters() if not n.startswith(ENCODER_PREFIXES) and p.requires_grad
        )

    # -- checks --------------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is ``[B, in_channels, *spatial]`` with every spatial size
        divisible by the encoder's total stride."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects [B, {self.in_channels}, *{self.spatial_dims} spatial dims], "
                f"got {tuple(x.shape)}"
            )
        if any(s % self.total_stride for s in x.shape[2:]):
            raise ValueError(
                f"{type(self).__name__}: input spatial size {tuple(x.shape[2:])} must be divisible by "
                f"the encoder's total stride {self.total_stride}; pad or crop the input"
            )

    def task_ids(self, task: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """``task`` checked as a ``[B]`` long tensor of ids in ``[0, num_tasks)``.

        ``None`` means task 0 and is allowed only when ``num_tasks == 1``.

        Raises:
            ValueError: for a missing, mis-shaped or out-of-range task id.
        """
        if task is None:
            if self.num_tasks != 1:
                raise ValueError(f"task ids are required: this network has num_tasks={self.num_tasks}")
            return torch.zeros(batch, dtype=torch.long, device=device)
        task = torch.as_tensor(task, device=device)
        if task.ndim == 0:
            task = task.expand(batch)
        if task.shape != (batch,) or task.dtype.is_floating_point or task.dtype == torch.bool:
            raise ValueError(
                f"task must be an integer tensor of shape [{batch}], got {task.dtype} {tuple(task.shape)}"
            )
        task = task.long()
        bad = (task < 0) | (task >= self.num_tasks)
        if bool(bad.any()):
            raise ValueError(
                f"unknown task id(s) {sorted(set(task[bad].tolist()))}: valid ids are 0..{self.num_tasks - 1} "
                f"(num_tasks={self.num_tasks})"
            )
        return task

    # -- encoder side and MOSMOS transfer ------------------------------------------------------

    def encode(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Encoder features and, with an attention head, the rescaled attention maps.

        Returns:
            ``features`` (the encoder's pyramid) and ``maps [B, T, *spatial of the head's level]``
            with each tag's map divided by its maximum over space (values in [0, 1], 1 at the
            tag's peak, 0 outside the body mask), or None without a head.
        """
        features = self.encoder.forward_features(x)
        if self.attention_head is None:
            return features, None
        _, attn = self.attention_head(features, mask=mask)
        peak = attn.flatten(2).amax(dim=2).clamp_min(torch.finfo(attn.dtype).tiny)
        maps = attn / peak.view(*peak.shape, *([1] * self.spatial_dims))
        return features, maps

    def maps_at(self, maps: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor | None:
        """Attention maps resized (bi/trilinear) to ``size``; None passes through."""
        if maps is None:
            return None
        if tuple(maps.shape[2:]) == tuple(size):
            return maps
        return F.interpolate(maps, size=tuple(size), mode=self._interp, align_corners=False)

    def with_maps(self, skip: torch.Tensor, maps: torch.Tensor | None) -> torch.Tensor:
        """``skip`` with the attention maps (resized to it) concatenated as extra channels."""
        if maps is None:
            return skip
        return torch.cat([skip, self.maps_at(maps, skip.shape[2:]).to(skip.dtype)], dim=1)


def sinusoidal_position(size: Sequence[int], dim: int) -> torch.Tensor:
    """Fixed sine/cosine position codes ``[prod(size), dim]`` of a grid's cells (row-major).

    Each axis gets ``dim // (2 * len(size))`` frequencies (geometric from 1 down to 1/100 rad per
    cell); channels left over are zero. Hand-written: MONAI's sin-cos embedding builds a fixed
    grid's parameter, whereas token grids and windows change size with the input.
    """
    n_axes = len(size)
    n_freq = dim // (2 * n_axes)
    code = torch.zeros(math.prod(size), dim)
    if n_freq == 0:
        return code
    freqs = 100.0 ** (-torch.arange(n_freq, dtype=torch.float32) / max(n_freq, 1))
    coords = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in size), indexing="ij")
    parts = []
    for c in coords:
        angle = c.reshape(-1, 1) * freqs
        parts += [angle.sin(), angle.cos()]
    code[:, : 2 * n_freq * n_axes] = torch.cat(parts, dim=1)
    return code


def num_heads_for(dim: int, head_dim: int) -> int:
    """The largest head count <= ``dim // head_dim`` (at least 1) that divides ``dim``."""
    heads = max(1, dim // head_dim)
    while dim % heads:
        heads -= 1
    return heads
