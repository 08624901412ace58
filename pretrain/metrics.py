"""Stage 1 evaluation: image–report retrieval, organ-tag AUROC/AP, attention pointing game, overlays.

- Retrieval recall@k (CLIP, Radford et al. 2021; CT-CLIP, Hamamci et al. 2024) over the validation set.
- Per-tag AUROC and average precision of the organ-tag logits against report tags (unknown ignored).
- Pointing game (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016): the
  peak of an organ's pixel-tag attention map must fall inside that organ's ground-truth label. The
  fraction of peaks on the map's border is reported alongside: a pilot found models that read the
  field of view's edge instead of the organ, which shows up there first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.metrics import compute_roc_auc

ArrayLike = np.ndarray | torch.Tensor


def _np(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _t(x: ArrayLike) -> torch.Tensor:
    return x.detach().cpu() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


# ----------------------------------------------------------------------------- retrieval
def retrieval_recall_from_similarity(sim: ArrayLike, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways from ``sim[i, j]`` = score of image i against report j; pair i is (i, i).

    Ties count against the match (rank = number of other candidates scoring >= the match), so a
    collapsed model with constant scores gets chance-level recall, not a perfect one. For k >= N the
    recall is 1. Also returns the median rank (1-based) each way.
    """
    s = np.asarray(_np(sim), dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square [N, N] matrix, got shape {s.shape}")
    diag = np.diag(s)
    # rank 0 = best; subtract 1 for the match itself (always >= itself)
    i2t = (s >= diag[:, None]).sum(axis=1) - 1
    t2i = (s >= diag[None, :]).sum(axis=0) - 1
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(i2t < k))
        out[f"t2i_R@{k}"] = float(np.mean(t2i < k))
    out["i2t_MedR"] = float(np.median(i2t + 1))
    out["t2i_MedR"] = float(np.median(t2i + 1))
    return out


def retrieval_recall(
    image_emb: ArrayLike, text_emb: ArrayLike, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image->text and text->image recall@k of paired embeddings ``[N, E]`` (cosine similarity)."""
    a = torch.as_tensor(_np(image_emb), dtype=torch.float64)
    b = torch.as_tensor(_np(text_emb), dtype=torch.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"embeddings must both be [N, E], got {tuple(a.shape)} and {tuple(b.shape)}")
    sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    return retrieval_recall_from_similarity(sim, ks)


# ----------------------------------------------------------------------------- tag classification
def average_precision(scores: ArrayLike, targets: ArrayLike) -> float:
    """Average precision, AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds.

    Written out because scikit-learn is not a dependency; this is the same step-wise definition as
    ``sklearn.metrics.average_precision_score`` (no interpolation; tied scores form one threshold).
    """
    s = np.asarray(_np(scores), dtype=np.float64).ravel()
    y = np.asarray(_np(targets)).ravel() > 0
    if not y.any():
        raise ValueError("average_precision needs at least one positive target")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    predicted = last_of_tie + 1
    precision = tp / predicted
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def tag_auroc_ap(logits: ArrayLike, targets: ArrayLike, names: Sequence[str]) -> dict[str, Any]:
    """Per-tag AUROC and AP over entries with target 0 or 1 (-1 = unknown, ignored), and macro means.

    A tag with only one class among its known entries cannot be scored: its values are ``None`` and
    it is left out of the means (``None`` too when no tag can be scored).

    Returns:
        ``per_tag``: ``{name: {"auroc", "ap", "n_pos", "n_neg"}}``; ``mean_auroc``, ``mean_ap`` (mAP):
        macro means over scored tags; ``n_tags_scored``.
    """
    x = np.asarray(_np(logits), dtype=np.float64)
    y = np.asarray(_np(targets)).astype(np.int64)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"logits and targets must both be [N, T], got {x.shape} and {y.shape}")
    if len(names) != x.shape[1]:
        raise ValueError(f"{len(names)} names for {x.shape[1]} tags")
    if not np.isin(y, (-1, 0, 1)).all():
        raise ValueError(f"targets must be 1, 0 or -1, got values {np.unique(y).tolist()}")
    per_tag: dict[str, dict[str, Any]] = {}
    aurocs, aps = [], []
    for t, name in enumerate(names):
        known = y[:, t] >= 0
        yt, xt = y[known, t], x[known, t]
        entry: dict[str, Any] = {
            "auroc": None,
            "ap": None,
            "n_pos": int(yt.sum()),
            "n_neg": int((yt == 0).sum()),
        }
        if entry["n_pos"] and entry["n_neg"]:
            entry["auroc"] = float(compute_roc_auc(torch.from_numpy(xt), torch.from_numpy(yt)))
            entry["ap"] = average_precision(xt, yt)
            aurocs.append(entry["auroc"])
            aps.append(entry["ap"])
        per_tag[name] = entry
    return {
        "per_tag": per_tag,
        "mean_auroc": float(np.mean(aurocs)) if aurocs else None,
        "mean_ap": float(np.mean(aps)) if aps else None,
        "n_tags_scored": len(aurocs),
    }


def finding_auroc(
    abnormal_logits: ArrayLike, findings: Sequence[Mapping[str, Any]], organ_names: Sequence[str]
) -> dict[str, float]:
    """AUROC of each organ's abnormal logit for each finding, against the scans where that organ is
    normal, from ground truth (synthetic ``findings.json``), not from the reports.

    An organ's abnormal tag pools several findings (a liver is abnormal for a lesion, a fatty liver or
    an enlarged one): this says which of them the model sees.

    Args:
        abnormal_logits: ``[N, T]`` abnormal logit per scan and organ tag.
        findings: per scan, ``{organ: {"status": "normal" | "abnormal" | ..., "findings": [codes]}}``
            (organs missing from a scan's entry are skipped for it).
        organ_names: the ``T`` tag names.

    Returns:
        ``{"<organ>/<finding>": AUROC}`` for every (organ, finding) with at least one scan showing it
        and one normal scan.
    """
    x = np.asarray(_np(abnormal_logits), dtype=np.float64)
    if x.ndim != 2 or x.shape != (len(findings), len(organ_names)):
        raise ValueError(
            f"abnormal_logits must be [N={len(findings)}, T={len(organ_names)}], got {tuple(x.shape)}"
        )
    out: dict[str, float] = {}
    for t, organ in enumerate(organ_names):
        normal: list[int] = []
        shown: dict[str, list[int]] = {}  # finding code -> scans whose organ shows it
        for i, f in enumerate(findings):
            state = f.get(organ) or {}
            if state.get("status") == "normal":
                normal.append(i)
            elif state.get("status") == "abnormal":
                for code in state.get("findings", []):
                    shown.setdefault(code, []).append(i)
        for code in sorted(shown):
            if normal:
                y = torch.tensor([1] * len(shown[code]) + [0] * len(normal))
                score = torch.from_numpy(x[shown[code] + normal, t])
                out[f"{organ}/{code}"] = float(compute_roc_auc(score, y))
    return out


# ----------------------------------------------------------------------------- pointing game
def _argmax_coords(maps: torch.Tensor) -> torch.Tensor:
    """``[T, *S]`` -> ``[T, ndim]`` integer coordinates of each map's maximum (first one on ties)."""
    shape = maps.shape[1:]
    flat = maps.reshape(maps.shape[0], -1).argmax(dim=1)
    return torch.stack(torch.unravel_index(flat, shape), dim=1)


def pointing_game(
    attn_maps: ArrayLike,
    labels: ArrayLike,
    organ_label_ids: Sequence[int | None],
    valid: ArrayLike,
    names: Sequence[str] | None = None,
    mode: str = "trilinear",
    spacing: Sequence[float] | None = None,
    tolerance_mm: float = 0.0,
) -> dict[str, Any]:
    """Hit rate of attention peaks inside the organ's ground-truth label.

    Args:
        attn_maps: ``[N, T, *S]`` pixel-tag attention, one map per organ tag.
        labels: ``[N, 1, *S_in]`` organ label maps on the same field of view (same preprocessing).
        organ_label_ids: for each tag, its value in ``labels``; ``None`` = not labelled (skipped).
        valid: ``[N, T]`` bool, the organ is present in that scan's ground truth.
        names: tag names for per-organ rates in ``per_organ``.
        mode: how a peak is carried to the label grid when ``S != S_in``: ``"trilinear"`` upsamples
            the map (linear interpolation) and takes its maximum; ``"nearest"`` maps the grid peak to
            the centre of its block (what nearest upsampling gives, without the corner bias of
            taking the first of the tied voxels).
        spacing: voxel size of ``labels`` in mm (one per spatial axis); with it, the distance from
            each peak to its organ is measured as well.
        tolerance_mm: a peak this close to its organ (voxel centre to nearest organ voxel centre) also
            counts as a hit in ``pointing_tolerant``: the tolerance of the original pointing game
            (15 pixels in Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV
            2016), which tells a peak just off the organ's edge from one elsewhere. Needs ``spacing``.

    Returns:
        ``pointing_game`` (hits / counted pairs; ``None`` when nothing counts), ``pointing_hits``,
        ``pointing_count``, ``border_fraction`` (share of peaks on the outer 1-voxel border of the
        attention grid, over valid pairs; ``None`` without any), ``attention_mass`` (mean share of
        the map, carried to the label grid, that falls inside the organ over the counted pairs: the
        "energy" pointing game of Score-CAM, Wang et al. 2020, which tells a diffuse map from a
        misplaced one; ``None`` when nothing counts) and, with ``names``, ``per_organ``
        (``{name: hit rate or None}``) and ``per_organ_mass``. With ``spacing`` also
        ``pointing_tolerant`` (hit rate within ``tolerance_mm``), ``peak_distance_mm`` (median distance
        from peak to organ over the counted pairs, 0 for a hit) and, with ``names``,
        ``per_organ_tolerant`` and ``per_organ_distance`` (median).
    """
    a = _t(attn_maps).float()
    lab = _t(labels)
    ok = _t(valid).bool()
    n, t = a.shape[:2]
    spatial = tuple(a.shape[2:])
    if lab.ndim != a.ndim or lab.shape[0] != n or lab.shape[1] != 1:
        raise ValueError(f"labels must be [N={n}, 1, *S_in], got {tuple(lab.shape)}")
    if tuple(ok.shape) != (n, t) or len(organ_label_ids) != t:
        raise ValueError(f"valid must be [N={n}, T={t}] and organ_label_ids of length {t}")
    if names is not None and len(names) != t:
        raise ValueError(f"{len(names)} names for {t} tags")
    if mode not in ("trilinear", "nearest"):
        raise ValueError(f"mode must be 'trilinear' or 'nearest', got {mode!r}")
    target = tuple(lab.shape[2:])
    if spacing is not None and (len(spacing) != len(target) or min(spacing) <= 0):
        raise ValueError(f"spacing must be {len(target)} positive voxel sizes (mm), got {list(spacing)}")
    if tolerance_mm < 0 or (tolerance_mm > 0 and spacing is None):
        raise ValueError(f"tolerance_mm={tolerance_mm} must be >= 0 and needs spacing")
    mm = None if spacing is None else torch.tensor([float(v) for v in spacing], dtype=torch.float64)
    distances: list[list[float]] = [[] for _ in range(t)]
    ids = torch.tensor([-1 if i is None else int(i) for i in organ_label_ids])
    labelled = torch.tensor([i is not None for i in organ_label_ids])
    hits = torch.zeros(t, dtype=torch.long)
    counts = torch.zeros(t, dtype=torch.long)
    mass = torch.zeros(t, dtype=torch.float64)
    on_border = n_valid = 0
    scale = torch.tensor(target, dtype=torch.float64) / torch.tensor(spatial, dtype=torch.float64)
    for s in range(n):
        sel = torch.nonzero(ok[s]).flatten()
        if sel.numel() == 0:
            continue
        grid_peak = _argmax_coords(a[s, sel])
        border = ((grid_peak == 0) | (grid_peak == torch.tensor(spatial) - 1)).any(dim=1)
        on_border += int(border.sum())
        n_valid += sel.numel()
        sel = sel[labelled[sel]]
        if sel.numel() == 0:
            continue
        if target == spatial:
            up = a[s, sel]
            peak = _argmax_coords(up)
        elif mode == "trilinear":
            interp = "trilinear" if len(spatial) == 3 else "bilinear"
            up = F.interpolate(a[s, sel][None], size=target, mode=interp, align_corners=False)[0]
            peak = _argmax_coords(up)
        else:
            up = F.interpolate(a[s, sel][None], size=target, mode="nearest")[0]
            peak = ((_argmax_coords(a[s, sel]).double() + 0.5) * scale).floor().long()
        value = lab[s, 0][tuple(peak.T)]
        hits[sel] += (value.long() == ids[sel]).long()
        counts[sel] += 1
        organ = lab[s, 0][None].long() == ids[sel].view(-1, *([1] * len(target)))
        if mm is not None:
            for j, tag in enumerate(sel.tolist()):
                voxels = torch.nonzero(organ[j]).double()
                gap = ((voxels - peak[j].double()) * mm).norm(dim=1).min() if len(voxels) else torch.inf
                distances[tag].append(float(gap))
        up = up.double().clamp_min(0).flatten(1)
        inside = (up * organ.flatten(1)).sum(1) / up.sum(1).clamp_min(1e-12)
        mass[sel] += inside
    total = int(counts.sum())
    out: dict[str, Any] = {
        "pointing_game": float(hits.sum()) / total if total else None,
        "pointing_hits": int(hits.sum()),
        "pointing_count": total,
        "border_fraction": on_border / n_valid if n_valid else None,
        "attention_mass": float(mass.sum()) / total if total else None,
    }
    if names is not None:
        out["per_organ"] = {
            name: float(hits[j]) / int(counts[j]) if counts[j] else None for j, name in enumerate(names)
        }
        out["per_organ_mass"] = {
            name: float(mass[j]) / int(counts[j]) if counts[j] else None for j, name in enumerate(names)
        }
    if mm is not None:
        near = [[d <= tolerance_mm + 1e-9 for d in ds] for ds in distances]
        every = [d for ds in distances for d in ds]
        out["pointing_tolerant"] = sum(map(sum, near)) / total if total else None
        out["peak_distance_mm"] = float(np.median(every)) if every else None
        if names is not None:
            out["per_organ_tolerant"] = {
                name: sum(near[j]) / len(near[j]) if near[j] else None for j, name in enumerate(names)
            }
            out["per_organ_distance"] = {
                name: float(np.median(distances[j])) if distances[j] else None for j, name in enumerate(names)
            }
    return out


# ----------------------------------------------------------------------------- overlays
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "tag"


def save_attention_overlays(
    image: ArrayLike,
    attn: ArrayLike,
    names: Sequence[str],
    out_dir: str | Path,
    prefix: str,
) -> list[Path]:
    """One PNG per tag: the axial slice through the attention peak, map overlaid on the image.

    ``image`` is ``[1, X, Y, Z]`` in RAS orientation (as preprocessed), ``attn`` ``[T, x, y, z]`` on
    the encoder's grid, upsampled trilinearly to the image. Slices are shown in radiological
    convention (patient's right on the left, anterior up). Files ``<prefix>_<name>.png`` are written
    to a temporary name and moved into place, so a reader never sees a half-written image.
    """
    img = _t(image).float()
    maps = _t(attn).float()
    if img.ndim != 4 or img.shape[0] != 1:
        raise ValueError(f"image must be [1, X, Y, Z], got {tuple(img.shape)}")
    if maps.ndim != 4 or maps.shape[0] != len(names):
        raise ValueError(f"attn must be [T={len(names)}, x, y, z], got {tuple(maps.shape)}")
    size = tuple(img.shape[1:])
    if tuple(maps.shape[1:]) != size:
        maps = F.interpolate(maps[None], size=size, mode="trilinear", align_corners=False)[0]
    peaks = _argmax_coords(maps)
    vol = img[0].numpy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for j, name in enumerate(names):
        px, py, pz = (int(v) for v in peaks[j])
        m = maps[j].numpy()
        lo, hi = float(m.min()), float(m.max())
        m_slice = (m[:, :, pz] - lo) / (hi - lo) if hi > lo else np.zeros_like(m[:, :, pz])
        # [x, y] -> rows anterior-first, columns patient-right-first (radiological view)
        fig = Figure(figsize=(4, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(vol[:, :, pz].T[::-1, ::-1], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.imshow(m_slice.T[::-1, ::-1], cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0, interpolation="bilinear")
        ax.plot([size[0] - 1 - px], [size[1] - 1 - py], marker="+", color="white", markersize=10)
        ax.set_title(f"{name}  (axial z={pz})", fontsize=9)
        ax.set_axis_off()
        path = out_dir / f"{prefix}_{_safe(name)}.png"
        tmp = out_dir / f".{path.name}.{os.getpid()}.tmp"
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
        written.append(path)
    return written
