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
    from models.attention import PixelTagAttention, TagAttentionHead
    from models.distributed import all_gather_with_grad
    from models.encoders import ImageEncoder, ResCNNEncoder, SwinViTEncoder, resize_mask
    from models.encoders.vit import ViTEncoder
    from models.losses import ClipLoss, TagLoss, class_balance_weights
    from models.pretrain_model import MosmosPretrainModel
    from models.registry import create_image_encoder, create_model, list_families, list_models, register_model
    from models.seg_losses import MarginalLoss, MaskedBCEDiceLoss, decode_prediction, organ_probabilities
    from models.segmentation import MOCTransSegmenter, SegmenterBase, UNETRSegmenter, UNetSegmenter
    from models.text import TextEncoder, build_small_bert

_EXPORTS = {
    "PixelTagAttention": "models.attention",
    "TagAttentionHead": "models.attention",
    "all_gather_with_grad": "models.distributed",
    "ImageEncoder": "models.encoders",
    "ResCNNEncoder": "models.encoders",
    "SwinViTEncoder": "models.encoders",
    "resize_mask": "models.encoders",
    "ViTEncoder": "models.encoders.vit",
    "ClipLoss": "models.losses",
    "TagLoss": "models.losses",
    "class_balance_weights": "models.losses",
    "MosmosPretrainModel": "models.pretrain_model",
    "create_image_encoder": "models.registry",
    "create_model": "models.registry",
    "list_families": "models.registry",
    "list_models": "models.registry",
    "register_model": "models.registry",
    "MOCTransSegmenter": "models.segmentation",
    "SegmenterBase": "models.segmentation",
    "UNETRSegmenter": "models.segmentation",
    "UNetSegmenter": "models.segmentation",
    "MarginalLoss": "models.seg_losses",
    "MaskedBCEDiceLoss": "models.seg_losses",
    "decode_prediction": "models.seg_losses",
    "organ_probabilities": "models.seg_losses",
    "TextEncoder": "models.text",
    "build_small_bert": "models.text",
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
