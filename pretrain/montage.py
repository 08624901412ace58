"""Per-organ attention montages: one organ's pixel-tag attention on several held-out scans, with
its peak and the organ's contour, so that a reader can judge where the attention goes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mosmos.pretrain.metrics import ArrayLike, _argmax_coords, _safe, _t


def save_attention_montages(
    images: ArrayLike,
    attn: ArrayLike,
    names: Sequence[str],
    out_dir: str | Path,
    labels: ArrayLike | None = None,
    organ_label_ids: Sequence[int | None] | None = None,
) -> dict[str, Path]:
    """One PNG per organ tag, ``montage_<name>.png``: its map on each of the ``N`` scans side by side.

    Each panel is the axial slice through the map's peak (map upsampled trilinearly to the image,
    radiological view as in :func:`save_attention_overlays`), the map overlaid on the image, its peak
    marked, and, where ``labels`` has the organ (``organ_label_ids``), the organ's contour on that
    slice and whether the peak hits it (the pointing game's verdict).

    Args:
        images: ``[N, 1, X, Y, Z]`` preprocessed scans (RAS).
        attn: ``[N, T, x, y, z]`` attention maps.
        names: the ``T`` tag names.
        out_dir: folder to write to (created).
        labels: optional ``[N, 1, X, Y, Z]`` ground-truth label maps on the images' grid.
        organ_label_ids: per tag, its value in ``labels`` (None: not labelled).

    Returns:
        ``{name: path}`` of the files written (each written to a temporary name, then moved).
    """
    imgs = _t(images).float()
    maps = _t(attn).float()
    if imgs.ndim != 5 or imgs.shape[1] != 1:
        raise ValueError(f"images must be [N, 1, X, Y, Z], got {tuple(imgs.shape)}")
    if maps.ndim != 5 or maps.shape[:2] != (imgs.shape[0], len(names)):
        raise ValueError(
            f"attn must be [N={imgs.shape[0]}, T={len(names)}, x, y, z], got {tuple(maps.shape)}"
        )
    lab = None if labels is None else _t(labels)
    if lab is not None and tuple(lab.shape) != tuple(imgs.shape):
        raise ValueError(f"labels must be shaped as the images {tuple(imgs.shape)}, got {tuple(lab.shape)}")
    if lab is not None and (organ_label_ids is None or len(organ_label_ids) != len(names)):
        raise ValueError(f"labels need organ_label_ids, one per tag ({len(names)})")
    size = tuple(imgs.shape[2:])
    if tuple(maps.shape[2:]) != size:
        maps = F.interpolate(maps, size=size, mode="trilinear", align_corners=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = imgs.shape[0]
    written: dict[str, Path] = {}
    for j, name in enumerate(names):
        fig = Figure(figsize=(2.6 * n, 2.9), dpi=100)
        FigureCanvasAgg(fig)
        peaks = _argmax_coords(maps[:, j])
        hits = 0
        scored = 0
        for i in range(n):
            px, py, pz = (int(v) for v in peaks[i])
            m = maps[i, j, :, :, pz].numpy()
            lo, hi = float(maps[i, j].min()), float(maps[i, j].max())
            m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
            ax = fig.add_subplot(1, n, i + 1)
            ax.imshow(imgs[i, 0, :, :, pz].numpy().T[::-1, ::-1], cmap="gray", vmin=0.0, vmax=1.0)
            ax.imshow(m.T[::-1, ::-1], cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0, interpolation="bilinear")
            verdict = ""
            label_id = None if lab is None else organ_label_ids[j]
            if label_id is not None:
                organ = (lab[i, 0] == int(label_id)).numpy()
                if organ.any():
                    hit = bool(organ[px, py, pz])
                    hits, scored = hits + hit, scored + 1
                    verdict = "  hit" if hit else "  miss"
                    if organ[:, :, pz].any():
                        ax.contour(
                            organ[:, :, pz].T[::-1, ::-1].astype(float),
                            levels=[0.5],
                            colors="lime",
                            linewidths=1.0,
                        )
                else:
                    verdict = "  (absent)"
            ax.plot([size[0] - 1 - px], [size[1] - 1 - py], marker="+", color="white", markersize=10, mew=2)
            ax.set_title(f"scan {i}  z={pz}{verdict}", fontsize=8)
            ax.set_axis_off()
        score = f"  pointing {hits}/{scored}" if scored else ""
        fig.suptitle(f"{name}: attention (jet), peak (+), organ contour (green){score}", fontsize=9)
        path = out_dir / f"montage_{_safe(name)}.png"
        tmp = out_dir / f".{path.name}.{os.getpid()}.tmp"
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
        written[name] = path
    return written
