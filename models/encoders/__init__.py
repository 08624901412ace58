"""Image encoders behind one interface (:class:`ImageEncoder`); importing registers them."""

from mosmos.models.encoders.base import ImageEncoder, resize_mask
from mosmos.models.encoders.cnn import ResCNNEncoder, set_padding_mode
from mosmos.models.encoders.vit import SwinViTEncoder

__all__ = ["ImageEncoder", "ResCNNEncoder", "SwinViTEncoder", "resize_mask", "set_padding_mode"]
