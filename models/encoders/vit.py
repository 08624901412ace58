"""Swin Transformer encoder: MONAI's SwinUNETR backbone behind the :class:`ImageEncoder` interface."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from models.encoders.base import ImageEncoder, with_spatial_dims
from models.registry import register_model

__all__ = ["SwinViTEncoder", "swinvit2d", "swinvit3d"]


class SwinViTEncoder(ImageEncoder):
    """Hierarchical Swin Transformer encoder (Liu et al., "Swin Transformer", ICCV 2021) as used by
    SwinUNETR (Hatamizadeh et al., "Swin UNETR", BrainLes 2021), from ``monai.networks.nets``.

    Five feature maps: the patch embedding and the output of each of the four Swin stages, with
    channels ``feature_size * [1, 2, 4, 8, 16]`` and strides ``patch_size * [1, 2, 4, 8, 16]``,
    each layer-normalised over channels (MONAI's ``normalize=True``). Position is encoded only by
    the windows' relative position bias, never absolutely.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        feature_size: embedding width of the first stage.
        depths: Swin blocks in each of the four stages.
        num_heads: attention heads in each stage; ``feature_size * 2**i`` must divide by ``num_heads[i]``.
        window_size: attention window edge (in tokens).
        patch_size: patch embedding edge (in voxels).
        mlp_ratio: MLP hidden size relative to the embedding.
        drop_rate, attn_drop_rate, drop_path_rate: dropout rates.
        use_v2: add SwinUNETR-v2 residual conv blocks before each stage.
        use_checkpoint: gradient checkpointing (memory for compute).

    Example::

        encoder = SwinViTEncoder(3, 1, feature_size=48)
        out = encoder(torch.randn(1, 1, 96, 96, 96))  # inputs divisible by 32
        encoder.feature_strides  # [2, 4, 8, 16, 32]
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_v2: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={spatial_dims} must be 2 or 3")
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels} must be >= 1")
        if len(depths) != 4 or any(d < 1 for d in depths):
            raise ValueError(f"depths={tuple(depths)} must be four positive ints (MONAI's Swin has 4 stages)")
        if len(num_heads) != 4 or any(h < 1 for h in num_heads):
            raise ValueError(f"num_heads={tuple(num_heads)} must be four positive ints")
        if feature_size < 1:
            raise ValueError(f"feature_size={feature_size} must be >= 1")
        for i, h in enumerate(num_heads):
            if (feature_size * 2**i) % h:
                raise ValueError(
                    f"feature_size={feature_size}: stage {i} width {feature_size * 2**i} is not divisible "
                    f"by num_heads[{i}]={h}"
                )
        if window_size < 1 or patch_size < 1:
            raise ValueError(f"window_size={window_size} and patch_size={patch_size} must be >= 1")
        for name, rate in (
            ("drop_rate", drop_rate),
            ("attn_drop_rate", attn_drop_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name}={rate} must be in [0, 1)")

        self._config = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "feature_size": feature_size,
            "depths": [int(d) for d in depths],
            "num_heads": [int(h) for h in num_heads],
            "window_size": window_size,
            "patch_size": patch_size,
            "mlp_ratio": mlp_ratio,
            "drop_rate": drop_rate,
            "attn_drop_rate": attn_drop_rate,
            "drop_path_rate": drop_path_rate,
            "use_v2": use_v2,
            "use_checkpoint": use_checkpoint,
        }
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.feature_channels = [feature_size * 2**i for i in range(5)]
        self.feature_strides = [patch_size * 2**i for i in range(5)]
        self.embed_dim = self.feature_channels[-1]
        self.swin = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(window_size,) * spatial_dims,
            patch_size=(patch_size,) * spatial_dims,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=nn.LayerNorm,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            use_v2=use_v2,
        )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_input(x, self.feature_strides[-1])
        return list(self.swin(x, normalize=True))


@register_model("image_encoder", "swinvit3d")
def swinvit3d(**kwargs: Any) -> SwinViTEncoder:
    """3D Swin Transformer encoder (see :class:`SwinViTEncoder`)."""
    return SwinViTEncoder(**with_spatial_dims(kwargs, 3, "swinvit3d"))


@register_model("image_encoder", "swinvit2d")
def swinvit2d(**kwargs: Any) -> SwinViTEncoder:
    """2D Swin Transformer encoder (see :class:`SwinViTEncoder`)."""
    return SwinViTEncoder(**with_spatial_dims(kwargs, 2, "swinvit2d"))
