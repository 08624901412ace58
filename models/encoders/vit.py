"""Transformer encoders behind the :class:`ImageEncoder` interface: MONAI's SwinUNETR backbone
(hierarchical Swin) and MONAI's plain ViT (the UNETR backbone)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.networks.nets.vit import ViT
from torch import nn

from mosmos.models.encoders.base import ImageEncoder, with_spatial_dims
from mosmos.models.registry import register_model

__all__ = ["SwinViTEncoder", "ViTEncoder", "swinvit2d", "swinvit3d", "vit2d", "vit3d"]


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


class ViTEncoder(ImageEncoder):
    """Plain Vision Transformer encoder (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR
    2021) as used by UNETR (Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image
    Segmentation", WACV 2022): MONAI's ``monai.networks.nets.ViT`` with ``classification=False``.

    The token grid is fixed at construction (a learned absolute position embedding per patch), so the
    input must be exactly ``img_size``. The features are the hidden states of four evenly spaced
    layers (layers 3, 6, 9, 12 of a 12-layer ViT, as UNETR reads them), reshaped to
    ``[B, hidden_size, *img_size / patch_size]``; the last one is layer-normalised (the ViT's output,
    UNETR's bottleneck). All four share one stride: ``feature_strides = [patch_size] * 4``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        img_size: input spatial size (an int for every axis, or one per axis); each divisible by
            ``patch_size``.
        patch_size: patch edge in voxels (also the feature stride).
        hidden_size: token width (the features' channels).
        mlp_dim: MLP hidden width.
        num_layers: transformer blocks (>= 1; with fewer than 4, layers repeat in the features).
        num_heads: attention heads; ``hidden_size`` must be divisible by it.
        proj_type: MONAI patch embedding, ``"conv"`` or ``"perceptron"``.
        pos_embed_type: ``"learnable"``, ``"sincos"`` or ``"none"``.
        dropout_rate: dropout in the blocks.
        qkv_bias: bias in the attention's q/k/v projection.

    Example::

        encoder = ViTEncoder(3, 1, img_size=(64, 64, 32), hidden_size=96, num_layers=4, num_heads=4)
        out = encoder(torch.randn(2, 1, 64, 64, 32))
        [f.shape for f in out["features"]]  # 4 x [2, 96, 4, 4, 2]
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        img_size: int | Sequence[int] = 96,
        patch_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        proj_type: str = "conv",
        pos_embed_type: str = "learnable",
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={spatial_dims} must be 2 or 3")
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels} must be >= 1")
        size = [int(img_size)] * spatial_dims if isinstance(img_size, int) else [int(s) for s in img_size]
        if len(size) != spatial_dims:
            raise ValueError(f"img_size={img_size} must be an int or {spatial_dims} ints")
        if patch_size < 1 or any(s < patch_size or s % patch_size for s in size):
            raise ValueError(f"img_size={tuple(size)} must be positive multiples of patch_size={patch_size}")
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1")
        if hidden_size < 1 or num_heads < 1 or hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must be a positive multiple of num_heads={num_heads}"
            )
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={dropout_rate} must be in [0, 1)")
        self._config = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "img_size": size,
            "patch_size": patch_size,
            "hidden_size": hidden_size,
            "mlp_dim": mlp_dim,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "proj_type": proj_type,
            "pos_embed_type": pos_embed_type,
            "dropout_rate": dropout_rate,
            "qkv_bias": qkv_bias,
        }
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.img_size = tuple(size)
        self.grid_size = tuple(s // patch_size for s in size)
        self.feature_channels = [hidden_size] * 4
        self.feature_strides = [patch_size] * 4
        self.embed_dim = hidden_size
        # 1-based layer numbers, evenly spaced and ending at the last layer (3, 6, 9, 12 for 12 layers).
        self.feature_layers = [max(1, round(num_layers * (k + 1) / 4)) for k in range(4)]
        self.vit = ViT(
            in_channels=in_channels,
            img_size=self.img_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type=proj_type,
            pos_embed_type=pos_embed_type,
            classification=False,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            qkv_bias=qkv_bias,
        )
        for block in self.vit.blocks:
            # MONAI's TransformerBlock builds this LayerNorm even without cross-attention and never
            # uses it then; parameters without gradient would make DDP fail (unused parameters).
            block.norm_cross_attn = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_input(x, self.feature_strides[-1])
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"ViTEncoder was built for img_size={self.img_size} (its position embedding is fixed), "
                f"got spatial size {tuple(x.shape[2:])}"
            )
        output, hidden = self.vit(x)
        states = [hidden[layer - 1] for layer in self.feature_layers[:-1]] + [output]
        b = x.shape[0]
        return [s.transpose(1, 2).reshape(b, s.shape[-1], *self.grid_size) for s in states]


@register_model("image_encoder", "vit3d")
def vit3d(**kwargs: Any) -> ViTEncoder:
    """3D plain ViT encoder (see :class:`ViTEncoder`); pass ``img_size``."""
    return ViTEncoder(**with_spatial_dims(kwargs, 3, "vit3d"))


@register_model("image_encoder", "vit2d")
def vit2d(**kwargs: Any) -> ViTEncoder:
    """2D plain ViT encoder (see :class:`ViTEncoder`); pass ``img_size``."""
    return ViTEncoder(**with_spatial_dims(kwargs, 2, "vit2d"))
