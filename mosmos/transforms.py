"""CT preprocessing shared by both stages: NIfTI -> RAS -> fixed spacing -> HU window -> body crop -> fixed size.

Stage 1 (report pretraining) and stage 2 (segmentation fine-tuning) must see volumes prepared the same
way, so both build their MONAI chains here from one :class:`PreprocessConfig`. The chain is split in two:

- :func:`build_preprocess` (``train=False``): deterministic, expensive (load + resample), cacheable
  with :func:`mosmos.cache.cached_dataset`; its cache key is :meth:`PreprocessConfig.fingerprint`.
- :func:`build_augment`: the random, cheap part, applied on top of cached items at train time.

Besides the image (scaled to ``[0, 1]``) every chain emits ``body_mask``: voxels above
``body_threshold_hu`` in the raw HU volume, holes filled per axial slice (lungs, bowel gas). Padding
uses the windowed value of air for the image and 0 for masks and labels, so padded voxels look like
the air around a real patient; the mask, not the intensity, tells a model where the body is.

Example::

    cfg = PreprocessConfig(spacing=(1.5, 1.5, 3.0), size=(128, 128, 64))
    item = build_preprocess(cfg, label_keys=("label",))({"image": "ct.nii.gz", "label": "seg.nii.gz"})
    item["image"].shape, item["body_mask"].dtype  # (1, 128, 128, 64), torch.uint8
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ShiftIntensityd,
    Spacingd,
    SpatialPadd,
)
from scipy import ndimage

from mosmos.errors import ConfigError, DataError

# Bump when the chain changes in a way that alters its output: every cache keyed by
# PreprocessConfig.fingerprint() is then invalidated.
PREPROCESS_VERSION = "1"
BODY_MASK_KEY = "body_mask"
AIR_HU = -1000.0
RESIZE_MODES = ("pad_crop", "resize", "pad")

# Train-time augmentation knobs and their defaults (probabilities in [0, 1]).
AUGMENT_DEFAULTS: dict[str, float] = {
    "affine_prob": 0.5,  # chance of one joint random affine (image, body mask, labels)
    "rotate_deg": 10.0,  # rotation range, +/- degrees about each axis
    "scale": 0.1,  # isotropic-ish zoom range, +/- fraction
    "translate": 0.05,  # translation range, +/- fraction of the volume size per axis
    "intensity_prob": 0.5,  # chance of a random intensity scale and, independently, shift
    "intensity_scale": 0.1,  # multiply by 1 + U(-s, s)
    "intensity_shift": 0.05,  # add U(-s, s) (image is in [0, 1])
    "noise_prob": 0.2,  # chance of additive gaussian noise
    "noise_std": 0.02,  # noise standard deviation upper bound (image units)
}
_PROB_KEYS = ("affine_prob", "intensity_prob", "noise_prob")


def _tuple(value: Any, n: int, cast: type, name: str) -> tuple:
    try:
        out = tuple(cast(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"preprocess.{name} must be a list of {n} numbers, got {value!r}") from None
    if len(out) != n:
        raise ConfigError(f"preprocess.{name} must have {n} values, got {len(out)}: {value!r}")
    return out


@dataclass
class PreprocessConfig:
    """How every CT volume is prepared, in both stages."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)  # target voxel size in mm, RAS axis order
    size: tuple[int, int, int] = (128, 128, 64)  # final network input size in voxels (RAS axes)
    hu_window: tuple[float, float] = (-200.0, 300.0)  # HU mapped linearly to [0, 1], then clipped
    body_threshold_hu: float = -500.0  # raw HU above this is body (the foreground mask)
    body_fill_holes: bool = True  # fill holes in the body mask per axial slice (lungs, bowel gas)
    crop_foreground: bool = True  # crop to the body bounding box before padding/cropping to size
    # "pad_crop": centre pad/crop to size (stage 1: one fixed-size view per scan); "resize": rescale
    # (distorts); "pad": pad to at least size and never crop (stage 2: the whole body, patches later)
    resize_mode: Literal["pad_crop", "resize", "pad"] = "pad_crop"

    def __post_init__(self) -> None:
        self.spacing = _tuple(self.spacing, 3, float, "spacing")
        self.size = _tuple(self.size, 3, int, "size")
        self.hu_window = _tuple(self.hu_window, 2, float, "hu_window")
        if any(s <= 0 for s in self.spacing):
            raise ConfigError(f"preprocess.spacing must be positive (mm), got {self.spacing}")
        if any(s <= 0 for s in self.size):
            raise ConfigError(f"preprocess.size must be positive (voxels), got {self.size}")
        if self.hu_window[0] >= self.hu_window[1]:
            raise ConfigError(
                f"preprocess.hu_window must be (low, high) with low < high, got {self.hu_window}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(
                f"preprocess.resize_mode must be one of {list(RESIZE_MODES)}, got {self.resize_mode!r}"
            )
        self.body_threshold_hu = float(self.body_threshold_hu)

    @property
    def air_value(self) -> float:
        """Windowed intensity of air (-1000 HU): the image padding value (0.0 for usual windows)."""
        lo, hi = self.hu_window
        return float(np.clip((AIR_HU - lo) / (hi - lo), 0.0, 1.0))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; an unknown key is a :class:`ConfigError` listing the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ConfigError(f"unknown preprocess key(s) {unknown}; valid keys: {valid}")
        return cls(**dict(d))

    def fingerprint(self) -> str:
        """Stable short hash of the config and :data:`PREPROCESS_VERSION` (cache keys)."""
        payload = json.dumps({"version": PREPROCESS_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _source_name(img: Any) -> str:
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<in-memory volume>"))


class BodyMaskd(MapTransform):
    """Adds ``mask_key``: ``image > threshold_hu`` on the raw HU volume (before windowing).

    Holes are filled per axial slice (the last, superior axis after RAS orientation) so air inside the
    body (lungs, bowel gas) stays body. The mask copies the image's geometry and applied operations, so
    later spatial transforms treat it exactly like the image.
    """

    def __init__(
        self,
        keys: Hashable,
        threshold_hu: float,
        mask_key: str = BODY_MASK_KEY,
        fill_holes: bool = True,
    ) -> None:
        super().__init__(keys)
        self.threshold_hu = float(threshold_hu)
        self.mask_key = mask_key
        self.fill_holes = fill_holes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.keys[0]]
        if img.ndim != 4:
            raise DataError(
                f"{_source_name(img)}: expected a 3D volume (one channel), got array shape "
                f"{tuple(img.shape)} after adding the channel axis"
            )
        arr = np.asarray(img[0].detach().cpu().numpy() if torch.is_tensor(img) else img[0])
        mask = arr > self.threshold_hu
        if not mask.any():
            raise DataError(
                f"{_source_name(img)}: no voxel above body_threshold_hu={self.threshold_hu} "
                f"(intensity range {arr.min():.1f}..{arr.max():.1f}); the image must be CT in Hounsfield units"
            )
        if self.fill_holes:
            in_plane = np.zeros((3, 3, 3), dtype=bool)
            in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
            mask = ndimage.binary_fill_holes(mask, structure=in_plane)
        out = torch.from_numpy(mask[None].astype(np.uint8))
        if isinstance(img, MetaTensor):
            out = MetaTensor(
                out, meta=deepcopy(img.meta), applied_operations=deepcopy(img.applied_operations)
            )
        d[self.mask_key] = out
        return d


def _check_keys(keys: Sequence[str], label_keys: Sequence[str]) -> tuple[list[str], list[str]]:
    keys, label_keys = list(keys), list(label_keys)
    if not keys:
        raise ConfigError("build_preprocess needs at least one image key")
    names = keys + label_keys
    if BODY_MASK_KEY in names or len(set(names)) < len(names):
        raise ConfigError(
            f"image keys {keys} and label keys {label_keys} must be distinct and not {BODY_MASK_KEY!r}"
        )
    return keys, label_keys


def build_preprocess(
    cfg: PreprocessConfig,
    keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = (),
    train: bool = False,
    augment: Mapping[str, float] | None = None,
) -> Compose:
    """The preprocessing chain for dicts of NIfTI paths; with ``train=True`` followed by :func:`build_augment`.

    Args:
        cfg: spacing, size, HU window, body mask settings.
        keys: image keys (CT in HU); the body mask is computed from the first.
        label_keys: integer label-map keys, resampled with nearest neighbour, padded with 0.
        train: append the random augmentation (keep ``False`` for the cacheable part).
        augment: overrides of :data:`AUGMENT_DEFAULTS` (only used with ``train=True``).

    Returns:
        A ``Compose`` emitting ``keys`` (float32 in [0, 1]), ``body_mask`` (uint8) and ``label_keys``
        (int16), each ``[1, *cfg.size]`` MetaTensors in RAS orientation at ``cfg.spacing`` (with
        ``resize_mode="pad"``: ``[1, *spatial]`` with every axis at least ``cfg.size``).
    """
    keys, label_keys = _check_keys(keys, label_keys)
    masks = [BODY_MASK_KEY, *label_keys]
    all_keys = keys + label_keys
    lo, hi = cfg.hu_window
    chain: list = [
        # image_only=True: the MetaTensor carries the affine and meta and is updated by every transform
        # (image_only=False would add a "<key>_meta_dict" copy that goes stale after resampling).
        LoadImaged(all_keys, reader="NibabelReader", dtype=np.float32, image_only=True),
        EnsureChannelFirstd(all_keys),
        # nibabel affines map voxels to RAS world coordinates; name the axis labels explicitly.
        Orientationd(all_keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(
            all_keys,
            pixdim=cfg.spacing,
            mode=["bilinear"] * len(keys) + ["nearest"] * len(label_keys),
            padding_mode=["border"] * len(keys) + ["zeros"] * len(label_keys),
        ),
        BodyMaskd(keys[0], cfg.body_threshold_hu, fill_holes=cfg.body_fill_holes),
        ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]
    if cfg.crop_foreground:
        chain.append(
            CropForegroundd(
                keys + masks,
                source_key=BODY_MASK_KEY,
                allow_smaller=True,
                start_coord_key=None,
                end_coord_key=None,
            )
        )
    if cfg.resize_mode == "pad_crop":
        # Same symmetric offsets for every key (same input shape); only the pad value differs.
        chain.append(ResizeWithPadOrCropd(keys, cfg.size, mode="constant", value=cfg.air_value))
        chain.append(ResizeWithPadOrCropd(masks, cfg.size, mode="constant", value=0))
    elif cfg.resize_mode == "pad":
        chain.append(SpatialPadd(keys, cfg.size, method="symmetric", mode="constant", value=cfg.air_value))
        chain.append(SpatialPadd(masks, cfg.size, method="symmetric", mode="constant", value=0))
    else:
        chain.append(Resized(keys, cfg.size, mode="trilinear", anti_aliasing=True))
        chain.append(Resized(masks, cfg.size, mode="nearest"))
    chain += _final_types(keys, label_keys)
    if train:
        chain += list(build_augment(cfg, keys, label_keys, augment).transforms)
    return Compose(chain)


def _final_types(keys: list[str], label_keys: list[str]) -> list:
    out = [EnsureTyped(keys, dtype=torch.float32), EnsureTyped(BODY_MASK_KEY, dtype=torch.uint8)]
    if label_keys:
        out.append(EnsureTyped(label_keys, dtype=torch.int16))
    return out


def resolve_augment(augment: Mapping[str, float] | None, what: str = "augment") -> dict[str, float]:
    """:data:`AUGMENT_DEFAULTS` updated by ``augment``; unknown keys and bad values are errors that
    name ``what`` (the config key the overrides came from)."""
    out = dict(AUGMENT_DEFAULTS)
    if augment is not None and not isinstance(augment, Mapping):
        raise ConfigError(f"{what} must be a mapping of augmentation settings, got {augment!r}")
    for k, v in (augment or {}).items():
        if k not in out:
            raise ConfigError(f"{what}: unknown key {k!r}; valid keys: {sorted(out)}")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}.{k} must be a number, got {v!r}") from None
        if not math.isfinite(out[k]) or out[k] < 0 or (k in _PROB_KEYS and out[k] > 1):
            raise ConfigError(f"{what}.{k} must be {'in [0, 1]' if k in _PROB_KEYS else '>= 0'}, got {v!r}")
    return out


def build_augment(
    cfg: PreprocessConfig,
    keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = (),
    augment: Mapping[str, float] | None = None,
) -> Compose:
    """Random train-time augmentation for items produced by :func:`build_preprocess`.

    One random affine (rotation, scale, translation) is applied jointly to the images (bilinear), the
    body mask and the labels (nearest), padding with air / 0; then random intensity scale, shift and
    gaussian noise on the images. Seed with ``compose.set_random_state(seed)`` for reproducible runs
    (``monai.data.DataLoader`` seeds each worker this way).
    """
    keys, label_keys = _check_keys(keys, label_keys)
    a = resolve_augment(augment)
    masks = [BODY_MASK_KEY, *label_keys]
    rot = np.deg2rad(a["rotate_deg"])
    air = cfg.air_value
    chain: list = []
    if air != 0.0:  # the affine pads with zeros: make air zero while it runs
        chain.append(ShiftIntensityd(keys, offset=-air))
    chain.append(
        RandAffined(
            keys + masks,
            prob=a["affine_prob"],
            rotate_range=(rot, rot, rot),
            scale_range=(a["scale"],) * 3,
            translate_range=tuple(a["translate"] * s for s in cfg.size),
            mode=["bilinear"] * len(keys) + ["nearest"] * len(masks),
            padding_mode="zeros",
        )
    )
    if air != 0.0:
        chain.append(ShiftIntensityd(keys, offset=air))
    chain += [
        RandScaleIntensityd(keys, factors=a["intensity_scale"], prob=a["intensity_prob"]),
        RandShiftIntensityd(keys, offsets=a["intensity_shift"], prob=a["intensity_prob"]),
        RandGaussianNoised(keys, prob=a["noise_prob"], std=a["noise_std"]),
    ]
    chain += _final_types(keys, label_keys)
    return Compose(chain)


def load_volume_meta(path: str | Path) -> dict[str, Any]:
    """Header geometry of a NIfTI volume without reading its voxels.

    Returns:
        ``shape`` (spatial, tuple of int), ``spacing`` (mm, array axis order), ``affine`` (4x4 float64
        voxel-to-RAS-world), ``orientation`` (axis codes such as ``"LPS"``) and ``dtype``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: volume not found")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for unreadable files
        raise DataError(f"{path}: not a readable NIfTI volume (.nii or .nii.gz): {e}") from None
    shape = tuple(int(s) for s in img.shape[:3])
    if len(img.shape) < 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {tuple(img.shape)}")
    affine = np.asarray(img.affine, dtype=np.float64)
    return {
        "shape": shape,
        "spacing": tuple(float(z) for z in img.header.get_zooms()[:3]),
        "affine": affine,
        "orientation": "".join(nib.aff2axcodes(affine)),
        "dtype": str(img.get_data_dtype()),
    }
