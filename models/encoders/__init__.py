"""Image encoders behind one interface (:class:`ImageEncoder`); importing registers them."""

from models.encoders.base import ImageEncoder, resize_mask
from models.encoders.cnn import ResCNNEncoder, set_padding_mode
from models.encoders.vit import SwinViTEncoder

__all__ = ["ImageEncoder", "ResCNNEncoder", "SwinViTEncoder", "resize_mask", "set_padding_mode"]
