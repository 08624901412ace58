"""Checks of one volume (image or label map), and of an image against its label map."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from mosmos.errors import Problem

MAX_SPACING_MM = 10.0
_NIFTI = (".nii", ".nii.gz")
_AFFINE_RTOL, _AFFINE_ATOL = 1e-3, 1e-2  # mm: a label map may differ from its image by rounding only


@dataclass
class VolumeInfo:
    """What the pair checks need from a volume that read."""

    shape: tuple[int, ...]
    affine: list[list[float]]
    spacing: tuple[float, ...]


def _read(path: str, deep: bool) -> tuple[tuple[int, ...], np.ndarray, tuple[float, ...], np.ndarray | None]:
    """(shape, affine, voxel sizes, voxels or None); raises whatever the reader raises."""
    if path.endswith(_NIFTI):
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        # voxel sizes as MONAI resamples with them: the lengths of the affine's columns (nibabel quietly
        # replaces a zero pixdim by 1, so the header's zooms can look fine when the affine is not)
        zooms = tuple(float(z) for z in np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0))
        data = np.asanyarray(img.dataobj) if deep else None
        return shape, np.asarray(img.affine, dtype=np.float64), zooms, data
    # NRRD / MHA / DICOM series, through ITK where installed; deferred because importing MONAI's
    # transforms takes seconds, which `mosmos check` on NIfTI files never needs
    from monai.transforms import LoadImage

    arr, meta = LoadImage(image_only=False)(path)
    affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
    zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
    data = np.asarray(arr)
    return tuple(int(s) for s in data.shape), affine, zooms, data


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def inspect_volume(
    path: str,
    role: str,
    *,
    deep: bool = True,
    declared: Iterable[int] | None = None,
    case: str | None = None,
    dataset: str | None = None,
) -> tuple[VolumeInfo | None, list[Problem]]:
    """Check one image (``role="image"``) or label map (``role="label"``).

    Args:
        path: the file.
        deep: read the voxels too (NaN/inf, label values, truncated files), not only the header.
        declared: label ids the dataset declares (label maps only); ``None`` skips that check.
        case, dataset: recorded on each problem.

    Returns:
        ``(info, problems)``; ``info`` is ``None`` when the file cannot be used at all.
    """
    problems: list[Problem] = []

    def bad(message: str, severity: str = "error") -> None:
        problems.append(Problem(path, message, case, dataset, severity))

    what = "label map" if role == "label" else "image"
    if not os.path.isfile(path):
        bad(f"{what} not found")
        return None, problems
    if os.path.getsize(path) == 0:
        bad(f"{what} is an empty file (0 bytes)")
        return None, problems
    try:
        shape, affine, zooms, data = _read(path, deep)
    except Exception as e:  # nibabel, gzip, zlib, ITK and numpy raise many types for broken files
        detail = f"{type(e).__name__}: {e}".strip()
        hint = " (truncated or corrupt file?)" if deep else ""
        bad(f"cannot read {what}{hint}: {detail}")
        return None, problems
    shape3 = _squeeze_trailing(shape)
    if len(shape3) != 3:
        kind = "4D" if len(shape3) == 4 else f"{len(shape3)}D"
        bad(f"{kind} {what} of shape {shape} where a 3D volume is expected (one CT volume per file)")
        return None, problems
    if min(shape3) < 1:
        bad(f"{what} has an empty axis: shape {shape}")
        return None, problems
    spacing = tuple(zooms[:3])
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        bad(f"voxel size {_mm(spacing)} mm is zero, negative or not finite; the header's pixdim is broken")
    elif max(spacing) > MAX_SPACING_MM:
        bad(
            f"voxel size {_mm(spacing)} mm exceeds {MAX_SPACING_MM:g} mm; the header's spacing (or its unit) "
            "is likely wrong"
        )
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        bad("the affine (voxel-to-world matrix) is singular or not finite")
    info = VolumeInfo(shape3, affine.tolist(), spacing)
    if data is None:
        return info, problems
    data = data.reshape(shape3)
    if role == "image":
        _image_values(data, bad)
    else:
        _label_values(data, declared, bad)
    return info, problems


def _mm(spacing: Sequence[float]) -> str:
    return " x ".join(f"{s:g}" for s in spacing)


def _image_values(data: np.ndarray, bad: Callable[..., None]) -> None:
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        n_bad = int(data.size - finite.sum())
        if n_bad:
            bad(f"{n_bad} NaN/inf voxel(s) of {data.size}")
            data = data[finite]
            if data.size == 0:
                return
    elif not np.issubdtype(data.dtype, np.integer):
        bad(f"image has data type {data.dtype}; expected numbers (Hounsfield units)")
        return
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        bad(f"image is constant (every voxel is {lo:g}): a blank scan?", "warning")
    elif lo >= -1.0 and hi <= 1.0 + 1e-6:
        bad(
            f"values lie in [{lo:g}, {hi:g}]: this looks normalised, not CT in Hounsfield units "
            "(the HU window would clip it to one value)",
            "warning",
        )


def _label_values(data: np.ndarray, declared: Iterable[int] | None, bad: Callable[..., None]) -> None:
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.issubdtype(data.dtype, np.floating):
            bad(f"label map has data type {data.dtype}; expected integer label ids")
            return
        finite = np.isfinite(data)
        fractional = finite & (data != np.round(data))
        if not finite.all() or fractional.any():
            odd = data[~finite | fractional]
            bad(
                f"label map has {odd.size} non-integer voxel value(s), e.g. {odd.flat[0]!r}; label maps must "
                "hold integer label ids (was it resampled with linear interpolation?)"
            )
            return
        data = data.astype(np.int64)
    values = [int(v) for v in np.unique(data)]
    negative = [v for v in values if v < 0]
    if negative:
        bad(f"label map holds negative id(s) {negative[:5]}")
    if declared is not None:
        declared = set(declared)
        undeclared = [v for v in values if v > 0 and v not in declared]
        if undeclared:
            bad(
                f"label id(s) {undeclared[:10]} are not declared by the dataset "
                f"(declared: 0, {', '.join(str(i) for i in sorted(declared))})"
            )
    if values == [0]:
        bad("label map is empty (background only)", "warning")


def pair_problems(
    image: VolumeInfo, label: VolumeInfo, label_path: str, case: str, dataset: str | None
) -> list[Problem]:
    if image.shape != label.shape:
        return [
            Problem(
                label_path,
                f"label map shape {label.shape} differs from its image's {image.shape}",
                case,
                dataset,
            )
        ]
    a, b = np.asarray(image.affine), np.asarray(label.affine)
    if not np.allclose(a, b, rtol=_AFFINE_RTOL, atol=_AFFINE_ATOL):
        return [
            Problem(
                label_path,
                f"label map affine differs from its image's (origin {_mm(b[:3, 3].round(2))} vs "
                f"{_mm(a[:3, 3].round(2))} mm, voxel size {_mm(label.spacing)} vs {_mm(image.spacing)} mm): "
                "they are not on the same grid",
                case,
                dataset,
            )
        ]
    return []
