"""What an encoder export is: its file names, the tensor-name prefix of each part, and the record
``encoder.json`` holds (:class:`EncoderExport`, with the input :class:`Preprocessing`).

Written by :mod:`mosmos.export_write`, read by :mod:`mosmos.export`, which re-exports these names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ENCODER_JSON",
    "ENCODER_WEIGHTS",
    "EXPORT_FORMAT",
    "PREFIXES",
    "PRETRAINED_CONFIG",
    "PRETRAINED_WEIGHTS",
    "EncoderExport",
    "Preprocessing",
]

EXPORT_FORMAT = "mosmos-encoder-v2"
ENCODER_JSON = "encoder.json"
ENCODER_WEIGHTS = "encoder.safetensors"
#: What ``mosmos export`` writes (Hugging Face's names): the record of :mod:`mosmos.api_export`, whose
#: ``encoder`` entry is an ``encoder.json``, and the weights, named as in ``encoder.safetensors``.
PRETRAINED_CONFIG = "config.json"
PRETRAINED_WEIGHTS = "model.safetensors"
#: Tensor-name prefix of each part in ``encoder.safetensors``.
PREFIXES = {part: f"{part}." for part in ("encoder", "tag_attention", "image_projection", "text_projection")}


@dataclass
class Preprocessing:
    """How the encoder's inputs were prepared (``mosmos.transforms`` does the same in both stages)."""

    spacing: list[float]  # voxel size in mm, RAS axis order
    size: list[int]  # network input in voxels
    hu_window: list[float]  # HU mapped linearly onto intensity_range, values outside clipped
    body_threshold_hu: float  # raw HU above this is body (the mask pooling and attention use)
    intensity_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    orientation: str = "RAS"

    def __post_init__(self) -> None:
        self.spacing = [float(v) for v in self.spacing]
        self.size = [int(v) for v in self.size]
        self.hu_window = [float(v) for v in self.hu_window]
        self.intensity_range = [float(v) for v in self.intensity_range]
        self.body_threshold_hu = float(self.body_threshold_hu)
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"preprocess.spacing={self.spacing} must be three positive numbers (mm)")
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"preprocess.size={self.size} must be three positive integers")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            raise ValueError(f"preprocess.hu_window={self.hu_window} must be [low, high] with low < high")
        if self.intensity_range != [0.0, 1.0]:
            raise ValueError(f"preprocess.intensity_range={self.intensity_range}: only [0, 1] is supported")

    def to_config(self, **overrides: Any) -> Any:
        """The :class:`mosmos.transforms.PreprocessConfig` of these settings (``overrides`` win)."""
        from mosmos.transforms import PreprocessConfig

        keys = ("spacing", "size", "hu_window", "body_threshold_hu")
        return PreprocessConfig(**{**{k: getattr(self, k) for k in keys}, **overrides})


@dataclass
class EncoderExport:
    """What ``encoder.json`` holds (its keys are these fields)."""

    architecture: str  # image encoder registry name (see `mosmos models`)
    encoder_kwargs: dict[str, Any]  # its constructor kwargs
    feature_channels: list[int] = field(default_factory=list)  # of its feature maps, high resolution first
    feature_strides: list[int] = field(default_factory=list)  # their strides relative to the input
    preprocess: Preprocessing | None = None  # None only in v1 exports that did not record it
    organs: list[str] = field(default_factory=list)  # tag order of the tag head
    tag_attention: dict[str, Any] | None = None  # TagAttentionHead.head_config() (None: no tag head)
    projections: dict[str, dict[str, int]] = field(default_factory=dict)  # image/text -> in_dim, out_dim
    temperature: float | None = None  # learned contrastive temperature (None: no text side)
    text: dict[str, Any] | None = None  # text tower: name, pooling, folder (relative to the export)...
    objective: dict[str, Any] = field(default_factory=dict)  # every loss weight and gradient setting
    commit: str = ""  # the mosmos commit (or version) that trained it
    format: str = EXPORT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (what ``encoder.json`` holds)."""
        return asdict(self)
