"""Overlay pictures of stage 2 validation predictions: one axial slice per case, the image in grey,
each organ's prediction filled and its ground truth outlined in the organ's colour, with a legend.

Drawn as stage 1 draws its attention montages (:mod:`mosmos.pretrain.montage`): matplotlib's
object API without pyplot (no display, no global state), volumes in RAS shown in radiological
view (patient's right on the left, anterior up), written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Soft-tissue window (HU) the image is shown in.
WINDOW_HU = (-160.0, 240.0)


# tab20's saturated colours, then its light ones; its two greys left out (the image is grey)
_PALETTE = [*range(0, 14, 2), *range(16, 20, 2), *range(1, 14, 2), *range(17, 20, 2)]


def organ_colour(index: int) -> tuple[float, float, float]:
    """The colour of output organ ``index`` (1-based, as in label maps): stable across cases and runs."""
    from matplotlib import colormaps

    rgba = colormaps["tab20"](_PALETTE[(index - 1) % len(_PALETTE)])
    return tuple(float(c) for c in rgba[:3])


def to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``volume`` (in the voxel grid of ``affine``) reordered and flipped to the closest RAS grid."""
    import nibabel as nib

    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
    )
    return nib.orientations.apply_orientation(volume, transform)


def ras_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes along the axes of :func:`to_ras`'s grid."""
    import nibabel as nib

    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    order = nib.orientations.io_orientation(affine)[:, 0].astype(int)  # voxel axis -> world axis
    out = np.empty(3)
    out[order] = zooms
    return tuple(float(z) for z in out)


def best_slice(label: np.ndarray, organs: int) -> int:
    """The axial slice (last axis) with the most labelled organ voxels (values 1..``organs``)."""
    fg = (label >= 1) & (label <= organs)
    counts = fg.reshape(-1, fg.shape[-1]).sum(axis=0)
    return int(counts.argmax()) if counts.max() > 0 else label.shape[-1] // 2


def overlay_png(
    image: np.ndarray,
    label: np.ndarray,
    prediction: np.ndarray,
    organs: Sequence[str],
    title: str,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> bytes:
    """A PNG of the axial slice through the most labelled foreground of one case.

    Args:
        image: ``[X, Y, Z]`` CT in HU, RAS (:func:`to_ras`).
        label: ``[X, Y, Z]`` ground truth on the same grid: 0 background, ``i`` organ ``organs[i-1]``
            (values above ``len(organs)``, the ignore value, are not drawn).
        prediction: ``[X, Y, Z]`` predicted label map on the same grid.
        organs: the output organs' names.
        title: the panel's title (dataset, case).
        spacing: voxel sizes (mm) of the grid, for the in-plane aspect ratio.

    Returns:
        The PNG file's bytes.

    Example:
        >>> png = overlay_png(ct, gt, pred, ["liver", "spleen"], "AbdomenA case_001")
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not image.shape == label.shape == prediction.shape or image.ndim != 3:
        raise ValueError(
            f"image, label and prediction must be one [X, Y, Z] grid, got {image.shape}, {label.shape}, "
            f"{prediction.shape}"
        )
    n = len(organs)
    z = best_slice(label, n)
    lo, hi = WINDOW_HU
    grey = np.clip((image[:, :, z].astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)

    def view(a: np.ndarray) -> np.ndarray:  # [x, y] -> rows anterior-first, columns right-first
        return a.T[::-1, ::-1]

    fig = Figure(figsize=(5.6, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 0.72, 0.92))
    aspect = spacing[1] / spacing[0]
    ax.imshow(view(grey), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect=aspect)
    handles = []
    pred_slice, gt_slice = prediction[:, :, z], label[:, :, z]
    for i in range(1, n + 1):
        predicted, truth = pred_slice == i, gt_slice == i
        if not (predicted.any() or truth.any()):
            continue
        colour = organ_colour(i)
        if predicted.any():
            rgba = np.zeros((*view(predicted).shape, 4), np.float32)
            rgba[view(predicted)] = (*colour, 0.45)
            ax.imshow(rgba, interpolation="nearest", aspect=aspect)
        if truth.any():
            # not antialiased: the outline keeps the organ's exact colour (what a test can look for)
            ax.contour(
                view(truth).astype(float), levels=[0.5], colors=[colour], linewidths=1.5, antialiased=False
            )
        handles.append(Patch(facecolor=(*colour, 0.45), edgecolor="none", label=organs[i - 1]))
    handles += [
        Patch(facecolor=(0.5, 0.5, 0.5, 0.45), edgecolor="none", label="filled: prediction"),
        Line2D([], [], color="0.3", linewidth=1.5, label="outline: ground truth"),
    ]
    # left-aligned in the figure, not centred on the image: a long title would run off the left edge
    fig.text(0.01, 0.985, f"{title}  (axial z={z})", fontsize=9, ha="left", va="top")
    ax.set_axis_off()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.72, 0.5), fontsize=8, frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.05)  # nothing clipped at the edges
    return buffer.getvalue()


def case_overlay(
    image_path: str | Path, label: np.ndarray, prediction: np.ndarray, organs, title: str
) -> bytes:
    """:func:`overlay_png` of a case as evaluated: ``label`` and ``prediction`` on the grid of the
    NIfTI at ``image_path`` (its original geometry), which is read and turned to RAS here."""
    import nibabel as nib

    img = nib.load(str(image_path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:  # one channel stored as [X, Y, Z, 1]
        data = data[..., 0]
    affine = img.affine
    return overlay_png(
        to_ras(data, affine),
        to_ras(np.asarray(label), affine),
        to_ras(np.asarray(prediction), affine),
        organs,
        title,
        ras_spacing(affine),
    )


def png_array(png: bytes) -> np.ndarray:
    """``[H, W, 3]`` float RGB in [0, 1] of a PNG's bytes (what TensorBoard's ``add_image`` takes)."""
    from matplotlib.image import imread

    return imread(io.BytesIO(png), format="png")[..., :3]
