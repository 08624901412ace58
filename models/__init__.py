"""mosmos models: ``torch.nn.Module``s and losses only (no file I/O, no Accelerate).

Ask for a model by name with its family's factory (:func:`create_image_encoder`, or
:func:`create_model` for any family); the built-in models register themselves on first use.

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
    from models.losses import ClipLoss, TagLoss, class_balance_weights
    from models.pretrain_model import MosmosPretrainModel
    from models.registry import create_image_encoder, create_model, list_families, list_models, register_model
    from models.text import TextEncoder, build_small_bert

_EXPORTS = {
    "PixelTagAttention": "models.attention",
    "TagAttentionHead": "models.attention",
    "all_gather_with_grad": "models.distributed",
    "ImageEncoder": "models.encoders",
    "ResCNNEncoder": "models.encoders",
    "SwinViTEncoder": "models.encoders",
    "resize_mask": "models.encoders",
    "ClipLoss": "models.losses",
    "TagLoss": "models.losses",
    "class_balance_weights": "models.losses",
    "MosmosPretrainModel": "models.pretrain_model",
    "create_image_encoder": "models.registry",
    "create_model": "models.registry",
    "list_families": "models.registry",
    "list_models": "models.registry",
    "register_model": "models.registry",
    "TextEncoder": "models.text",
    "build_small_bert": "models.text",
}

__all__ = [
    "ClipLoss",
    "ImageEncoder",
    "MosmosPretrainModel",
    "PixelTagAttention",
    "ResCNNEncoder",
    "SwinViTEncoder",
    "TagAttentionHead",
    "TagLoss",
    "TextEncoder",
    "all_gather_with_grad",
    "build_small_bert",
    "class_balance_weights",
    "create_image_encoder",
    "create_model",
    "list_families",
    "list_models",
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
