"""mosmos models: ``torch.nn.Module``s and losses only (no file I/O, no Accelerate).

Ask for a model by name with its family's factory (:func:`create_image_encoder`, or
:func:`create_model` for any family, e.g. ``create_model("segmenter", "unet", ...)``); the
built-in models register themselves on first use.

Names are imported lazily (PEP 562): ``from models import ClipLoss`` does not import MONAI or
transformers, which keeps multi-process launches and the CLI quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mosmos.models.attention import PixelTagAttention
    from mosmos.models.distributed import all_gather_with_grad
    from mosmos.models.encoders import ImageEncoder, ResCNNEncoder, SwinViTEncoder, resize_mask
    from mosmos.models.encoders.vit import ViTEncoder
    from mosmos.models.losses import ClipLoss, TagLoss, class_balance_weights
    from mosmos.models.pretrain_model import MosmosPretrainModel
    from mosmos.models.registry import (
        create_image_encoder,
        create_model,
        list_families,
        list_models,
        register_model,
    )
    from mosmos.models.seg_decode import decode_prediction, organ_probabilities
    from mosmos.models.seg_losses import MarginalLoss, MaskedBCEDiceLoss
    from mosmos.models.segmentation import MOCTransSegmenter, SegmenterBase, UNETRSegmenter, UNetSegmenter
    from mosmos.models.tag_head import TagAttentionHead, TagHeadConfig
    from mosmos.models.text import TextEncoder, build_small_bert

_EXPORTS = {
    "PixelTagAttention": "mosmos.models.attention",
    "TagAttentionHead": "mosmos.models.tag_head",
    "TagHeadConfig": "mosmos.models.tag_head",
    "all_gather_with_grad": "mosmos.models.distributed",
    "ImageEncoder": "mosmos.models.encoders",
    "ResCNNEncoder": "mosmos.models.encoders",
    "SwinViTEncoder": "mosmos.models.encoders",
    "resize_mask": "mosmos.models.encoders",
    "ViTEncoder": "mosmos.models.encoders.vit",
    "ClipLoss": "mosmos.models.losses",
    "TagLoss": "mosmos.models.losses",
    "class_balance_weights": "mosmos.models.losses",
    "MosmosPretrainModel": "mosmos.models.pretrain_model",
    "create_image_encoder": "mosmos.models.registry",
    "create_model": "mosmos.models.registry",
    "list_families": "mosmos.models.registry",
    "list_models": "mosmos.models.registry",
    "register_model": "mosmos.models.registry",
    "MOCTransSegmenter": "mosmos.models.segmentation",
    "SegmenterBase": "mosmos.models.segmentation",
    "UNETRSegmenter": "mosmos.models.segmentation",
    "UNetSegmenter": "mosmos.models.segmentation",
    "MarginalLoss": "mosmos.models.seg_losses",
    "MaskedBCEDiceLoss": "mosmos.models.seg_losses",
    "decode_prediction": "mosmos.models.seg_decode",
    "organ_probabilities": "mosmos.models.seg_decode",
    "TextEncoder": "mosmos.models.text",
    "build_small_bert": "mosmos.models.text",
}

__all__ = [
    "ClipLoss",
    "ImageEncoder",
    "MOCTransSegmenter",
    "MarginalLoss",
    "MaskedBCEDiceLoss",
    "MosmosPretrainModel",
    "PixelTagAttention",
    "ResCNNEncoder",
    "SegmenterBase",
    "SwinViTEncoder",
    "TagAttentionHead",
    "TagHeadConfig",
    "TagLoss",
    "TextEncoder",
    "UNETRSegmenter",
    "UNetSegmenter",
    "ViTEncoder",
    "all_gather_with_grad",
    "build_small_bert",
    "class_balance_weights",
    "create_image_encoder",
    "create_model",
    "decode_prediction",
    "list_families",
    "list_models",
    "organ_probabilities",
    "register_model",
    "resize_mask",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
