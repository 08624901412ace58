"""Segmentation evaluation: per-case Dice and HD95, per-dataset summaries, CSV and a printable table.

Conventions (they change reported numbers, so state them in papers):

* Only the organs a case's dataset labels are scored: predicting an organ the dataset does not
  annotate is neither rewarded nor penalised.
* Dice is MONAI's ``compute_dice(..., ignore_empty=False)``: both masks empty -> 1.0 (nothing to
  find, nothing predicted), exactly one empty -> 0.0. nnU-Net v2 and MONAI's default
  (``ignore_empty=True``) instead report NaN when the ground truth is empty, dropping such cases
  from the mean; we count a correct "absent" as a hit and any false positive/negative as a miss.
* HD95 is MONAI's ``compute_hausdorff_distance(percentile=95, spacing=...)`` in mm: the larger of
  the two directed 95th percentiles of the distances between the masks' surface voxels (surfaces
  by binary erosion; exact Euclidean distances with the voxel spacing). Both empty -> 0.0; exactly
  one empty -> NaN (undefined: MONAI yields NaN there and other tools infinity, which would make
  every mean infinite). Means over cases are NaN-means, so HD95 means describe the cases where
  both masks exist; the ``hd95_missing`` counts in :func:`summarize` say how many were left out,
  and Dice (0 for those cases) accounts for them.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from mosmos.io import atomic_path

__all__ = ["CSV_COLUMNS", "case_metrics", "format_dice_table", "summarize", "write_case_csv"]

CSV_COLUMNS = ("dataset", "case", "organ", "dice", "hd95", "gt_voxels", "pred_voxels")


def _crop_to_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus a one-voxel margin.

    Dice and surface distances are unchanged by this (nothing outside the box is foreground, and
    the margin keeps the masks' borders off the array's edge), while full CT volumes shrink to the
    organ's size, so the one-hot float copies MONAI needs stay small.
    """
    union = pred | gt
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        lo, hi = max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])
        slices.append(slice(lo, hi))
    return pred[tuple(slices)], gt[tuple(slices)]


def _organ_scores(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], hd95: bool = True
) -> tuple[float, float]:
    """Dice and HD95 (mm) of two boolean masks, with the empty-mask conventions of this module
    (HD95 is NaN when ``hd95`` is false)."""
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return 1.0, 0.0
    pred, gt = _crop_to_union(pred, gt)
    y_pred = torch.from_numpy(np.ascontiguousarray(pred))[None, None].float()
    y = torch.from_numpy(np.ascontiguousarray(gt))[None, None].float()
    dice = float(compute_dice(y_pred, y, include_background=True, ignore_empty=False)[0, 0])
    if not (p_any and g_any) or not hd95:
        return dice, math.nan
    with warnings.catch_warnings():
        # MONAI 1.5 calls its own deprecated get_mask_edges(always_return_as_numpy=...) internally
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        distance = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
        )
    return dice, float(distance[0, 0])


def case_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    organs: Sequence[str],
    labelled: Sequence[str],
    spacing: Sequence[float],
    hd95: bool = True,
) -> list[dict[str, Any]]:
    """Dice and HD95 of each labelled organ of one case.

    Args:
        pred: integer label map (0 background, ``k`` = ``organs[k - 1]``), in the label's geometry.
        label: ground-truth label map, same shape and encoding.
        organs: names of all organs, in label-value order.
        labelled: the organs this case's dataset annotates; only these are reported (in this order).
        spacing: voxel size in mm per axis of ``pred``, for HD95.
        hd95: compute HD95 (the slower part); NaN when false.

    Returns:
        One row per labelled organ: ``{"organ", "dice", "hd95", "gt_voxels", "pred_voxels"}`` (see the
        module docstring for the empty-mask conventions; ``hd95`` may be NaN).
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"pred {pred.shape} and label {label.shape} must have the same shape")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} must have one value per axis of {pred.shape}")
    unknown = [name for name in labelled if name not in organs]
    if unknown:
        raise ValueError(f"labelled organs {unknown} are not in organs {list(organs)}")
    rows = []
    for name in labelled:
        value = list(organs).index(name) + 1
        p, g = pred == value, label == value
        dice, distance = _organ_scores(p, g, spacing, hd95)
        rows.append(
            {
                "organ": name,
                "dice": dice,
                "hd95": distance,
                "gt_voxels": int(g.sum()),
                "pred_voxels": int(p.sum()),
            }
        )
    return rows


def _nanmean(values: Sequence[float]) -> float:
    """Mean over the non-NaN values; NaN when there are none (without numpy's empty-slice warning)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(sum(kept) / len(kept)) if kept else math.nan


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per-dataset, per-organ and overall means of :func:`case_metrics` rows.

    Args:
        rows: rows of :func:`case_metrics`, each also carrying ``"case"`` and ``"dataset"``.

    Returns:
        A flat dict of floats (for ``metrics.json``), with, for each dataset ``d`` and organ ``o``
        it labels: ``"dice/d/o"`` (mean Dice over cases), ``"hd95/d/o"`` (NaN-mean HD95; NaN if no
        case has both masks), ``"n/d/o"`` (cases) and ``"hd95_missing/d/o"`` (cases with NaN HD95);
        per dataset ``"dice/d"`` and ``"hd95/d"`` (means over its organs' means; HD95 NaN-mean); and
        ``"mean_dice"`` and ``"mean_hd95"``, the means over all (dataset, organ) means, so every
        dataset's organ counts once however many cases it has. Keys are sorted; names must not
        contain ``"/"``.
    """
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        dataset, organ = str(row["dataset"]), str(row["organ"])
        if "/" in dataset or "/" in organ:
            raise ValueError(f"dataset {dataset!r} and organ {organ!r} must not contain '/'")
        groups.setdefault(dataset, {}).setdefault(organ, []).append(row)

    out: dict[str, float] = {}
    all_dice, all_hd = [], []
    for dataset in sorted(groups):
        organ_dice, organ_hd = [], []
        for organ in sorted(groups[dataset]):
            group = groups[dataset][organ]
            dice = _nanmean([float(r["dice"]) for r in group])
            hds = [float(r["hd95"]) for r in group]
            hd = _nanmean(hds)
            out[f"dice/{dataset}/{organ}"] = dice
            out[f"hd95/{dataset}/{organ}"] = hd
            out[f"n/{dataset}/{organ}"] = float(len(group))
            out[f"hd95_missing/{dataset}/{organ}"] = float(sum(math.isnan(h) for h in hds))
            organ_dice.append(dice)
            organ_hd.append(hd)
        out[f"dice/{dataset}"] = _nanmean(organ_dice)
        out[f"hd95/{dataset}"] = _nanmean(organ_hd)
        all_dice += organ_dice
        all_hd += organ_hd
    out["mean_dice"] = _nanmean(all_dice)
    out["mean_hd95"] = _nanmean(all_hd)
    return dict(sorted(out.items()))


def _csv_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def write_case_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write rows as CSV (columns :data:`CSV_COLUMNS`, other keys dropped) atomically.

    Floats are written with ``repr`` (they read back exactly) and NaN as ``nan``, which both
    ``float()`` and pandas parse back to NaN.
    """
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([_csv_value(row[col]) for col in CSV_COLUMNS])


def read_case_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows written by :func:`write_case_csv`, with numbers parsed back (NaN from ``nan``)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key in ("dice", "hd95"):
            row[key] = float(row[key])
        for key in ("gt_voxels", "pred_voxels"):
            row[key] = int(row[key])
    return rows


def format_dice_table(summary: dict[str, float], organs: Sequence[str], digits: int = 3) -> str:
    """Markdown table of mean Dice, one row per organ and one column per dataset, plus a mean row.

    Args:
        summary: output of :func:`summarize`.
        organs: row order (organs absent from every dataset still get a row).
        digits: decimals shown.

    Returns:
        The table; cells of organs a dataset does not label are ``-``, and a last line gives the
        overall ``mean_dice``.
    """
    datasets = sorted(k.split("/")[1] for k in summary if k.startswith("dice/") and k.count("/") == 1)

    def cell(key: str) -> str:
        value = summary.get(key)
        return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    header = ["organ", *datasets]
    lines = [header]
    for organ in organs:
        lines.append([organ, *(cell(f"dice/{d}/{organ}") for d in datasets)])
    lines.append(["mean", *(cell(f"dice/{d}") for d in datasets)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "| " + " | ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)) + " |"

    table = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    table += [fmt(line) for line in lines[1:]]
    table.append(f"\nmean Dice over dataset x organ: {cell('mean_dice')}")
    return "\n".join(table)
