"""Stage 2 segmenters behind one interface (:class:`SegmenterBase`); importing registers them in the
``"segmenter"`` family: ``unet``, ``mo_ctrans`` (the paper's decoder), ``mo_ctrans_conv`` (a
convolutional decoder with windowed task-token transformers), ``unetr`` and ``ensemble`` (several of
one of them, probabilities averaged).

Example::

    from mosmos.models import create_image_encoder, create_model

    encoder = create_image_encoder("rescnn3d", channels=(16, 32, 48, 64), strides=(2, 2, 2, 2))
    net = create_model("segmenter", "mo_ctrans", encoder=encoder, num_classes=11, num_tasks=3)
    logits = net(image, task=task_ids, mask=body)  # [B, 11, *image.shape[2:]]
"""

from mosmos.models.segmentation.common import ENCODER_PREFIXES, TASK_SPECIFIC, SegmenterBase, UpStage
from mosmos.models.segmentation.ensemble import EnsembleSegmenter
from mosmos.models.segmentation.mo_ctrans import MOCTransSegmenter
from mosmos.models.segmentation.mo_ctrans_conv import MOCTransConvSegmenter, TaskTokenTransformer
from mosmos.models.segmentation.unet import UNetSegmenter
from mosmos.models.segmentation.unetr import UNETRSegmenter

__all__ = [
    "ENCODER_PREFIXES",
    "TASK_SPECIFIC",
    "EnsembleSegmenter",
    "MOCTransConvSegmenter",
    "MOCTransSegmenter",
    "SegmenterBase",
    "TaskTokenTransformer",
    "UNETRSegmenter",
    "UNetSegmenter",
    "UpStage",
]
