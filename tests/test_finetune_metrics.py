"""Segmentation metrics against independent computations on small synthetic masks."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from mosmos.finetune.metrics import CSV_COLUMNS, case_metrics, format_dice_table, summarize, write_case_csv

ORGANS = ["liver", "spleen", "kidney"]


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Coordinates of foreground voxels with a face neighbour outside the mask (or the array)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return np.argwhere(mask & ~inner)


def reference_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Symmetric 95th-percentile surface distance by brute force over all surface-voxel pairs."""
    pa = surface_voxels(a) * np.asarray(spacing, np.float64)
    pb = surface_voxels(b) * np.asarray(spacing, np.float64)
    dist = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(dist.min(1), 95), np.percentile(dist.min(0), 95))


def reference_dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * int((a & b).sum()) / (int(a.sum()) + int(b.sum()))


def test_parallel_plates_have_known_hd95_in_mm():
    # One-voxel-thick planes 3 voxels apart along axis 0 (2.5 mm): every surface distance is 7.5 mm.
    pred = np.zeros((10, 6, 5), np.int16)
    label = np.zeros_like(pred)
    pred[2] = 1
    label[5] = 1
    (row,) = case_metrics(pred, label, ORGANS, ["liver"], spacing=(2.5, 1.0, 0.7))
    assert row["hd95"] == pytest.approx(7.5, rel=1e-6)
    assert row["dice"] == 0.0
    assert row["gt_voxels"] == 30 and row["pred_voxels"] == 30


def test_offset_cubes_3d_anisotropic():
    label = np.zeros((12, 12, 10), np.uint8)
    pred = np.zeros_like(label)
    label[2:8, 2:8, 2:6] = 2  # spleen
    pred[4:10, 2:8, 3:7] = 2  # shifted by 2 voxels on axis 0 and 1 on axis 2
    spacing = (0.8, 0.8, 2.5)
    (row,) = case_metrics(pred, label, ORGANS, ["spleen"], spacing)
    a, b = pred == 2, label == 2
    assert row["dice"] == pytest.approx(reference_dice(a, b)) and reference_dice(a, b) == pytest.approx(0.5)
    assert row["hd95"] == pytest.approx(reference_hd95(a, b, spacing), rel=1e-5)
    assert row["hd95"] > 0
    # HD95 lies below the full Hausdorff distance (the largest nearest-surface distance).
    pa, pb = surface_voxels(a) * spacing, surface_voxels(b) * spacing
    dist = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    assert row["hd95"] <= max(dist.min(1).max(), dist.min(0).max()) + 1e-6


def test_irregular_2d_masks_against_reference():
    rng = np.random.default_rng(0)
    label = np.zeros((20, 16), np.int64)
    pred = np.zeros_like(label)
    label[3:15, 4:12] = 3
    label[rng.random(label.shape) < 0.1] = 0
    pred[5:17, 2:11] = 3
    pred[rng.random(pred.shape) < 0.1] = 0
    spacing = (0.7, 1.9)
    (row,) = case_metrics(pred, label, ORGANS, ["kidney"], spacing)
    a, b = pred == 3, label == 3
    assert row["dice"] == pytest.approx(reference_dice(a, b))
    assert row["hd95"] == pytest.approx(reference_hd95(a, b, spacing), rel=1e-5)


def test_mask_touching_the_array_border():
    label = np.zeros((8, 8), np.int64)
    pred = np.zeros_like(label)
    label[0:5, 0:8] = 1
    pred[0:6, 1:8] = 1
    (row,) = case_metrics(pred, label, ORGANS, ["liver"], (1.5, 1.0))
    assert row["hd95"] == pytest.approx(reference_hd95(pred == 1, label == 1, (1.5, 1.0)), rel=1e-5)


def test_empty_conventions():
    label = np.zeros((6, 6, 6), np.int64)
    pred = np.zeros_like(label)
    label[1:3, 1:3, 1:3] = 1  # liver only in the label (missed)
    pred[3:5, 3:5, 3:5] = 2  # spleen only in the prediction (false positive)
    rows = {r["organ"]: r for r in case_metrics(pred, label, ORGANS, ORGANS, (1.0, 1.0, 1.0))}
    assert rows["liver"]["dice"] == 0.0 and math.isnan(rows["liver"]["hd95"])
    assert rows["spleen"]["dice"] == 0.0 and math.isnan(rows["spleen"]["hd95"])
    assert rows["kidney"]["dice"] == 1.0 and rows["kidney"]["hd95"] == 0.0  # both empty
    assert (rows["liver"]["gt_voxels"], rows["liver"]["pred_voxels"]) == (8, 0)
    assert (rows["spleen"]["gt_voxels"], rows["spleen"]["pred_voxels"]) == (0, 8)
    assert (rows["kidney"]["gt_voxels"], rows["kidney"]["pred_voxels"]) == (0, 0)


def test_only_labelled_organs_are_reported_in_order():
    label = np.zeros((6, 6), np.int64)
    label[1:4, 1:4] = 1
    label[4:6, 4:6] = 3
    pred = label.copy()
    pred[0, :] = 2  # an organ the dataset does not label: ignored
    rows = case_metrics(pred, label, ORGANS, ["kidney", "liver"], (1.0, 1.0))
    assert [r["organ"] for r in rows] == ["kidney", "liver"]
    assert all(r["dice"] == 1.0 and r["hd95"] == 0.0 for r in rows)
    with pytest.raises(ValueError, match="not in organs"):
        case_metrics(pred, label, ORGANS, ["pancreas"], (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(pred, label, ORGANS, ["liver"], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="same shape"):
        case_metrics(pred[:5], label, ORGANS, ["liver"], (1.0, 1.0))


def make_rows():
    def row(dataset, case, organ, dice, hd95):
        return {
            "dataset": dataset,
            "case": case,
            "organ": organ,
            "dice": dice,
            "hd95": hd95,
            "gt_voxels": 10,
            "pred_voxels": 12,
        }

    return [
        row("A", "a1", "liver", 0.9, 2.0),
        row("A", "a2", "liver", 0.7, 4.0),
        row("A", "a1", "spleen", 0.8, math.nan),
        row("A", "a2", "spleen", 0.6, 3.0),
        row("B", "b1", "liver", 0.5, 1.0),
        row("B", "b2", "liver", 0.0, math.nan),
        row("B", "b3", "liver", 0.4, 5.0),
    ]


def test_summarize_by_hand():
    s = summarize(make_rows())
    assert s["dice/A/liver"] == pytest.approx(0.8)
    assert s["hd95/A/liver"] == pytest.approx(3.0)
    assert s["dice/A/spleen"] == pytest.approx(0.7)
    assert s["hd95/A/spleen"] == pytest.approx(3.0)  # NaN left out
    assert s["hd95_missing/A/spleen"] == 1.0 and s["hd95_missing/A/liver"] == 0.0
    assert s["n/A/liver"] == 2.0 and s["n/B/liver"] == 3.0
    assert s["dice/B/liver"] == pytest.approx(0.3)
    assert s["hd95/B/liver"] == pytest.approx(3.0)
    assert s["dice/A"] == pytest.approx(0.75)
    assert s["dice/B"] == pytest.approx(0.3)
    assert s["mean_dice"] == pytest.approx((0.8 + 0.7 + 0.3) / 3)  # over (dataset, organ) means
    assert s["mean_hd95"] == pytest.approx(3.0)
    assert all(isinstance(v, float) for v in s.values())
    assert "dice/B/spleen" not in s
    with pytest.raises(ValueError, match="must not contain"):
        summarize([{**make_rows()[0], "dataset": "a/b"}])


def test_summarize_all_hd95_missing_is_nan():
    s = summarize([{"dataset": "A", "case": "x", "organ": "liver", "dice": 0.0, "hd95": math.nan}])
    assert math.isnan(s["hd95/A/liver"]) and math.isnan(s["mean_hd95"])
    assert s["mean_dice"] == 0.0


def test_case_csv_round_trip(tmp_path):
    rows = make_rows()
    rows[0]["extra"] = "dropped"
    path = tmp_path / "sub" / "cases.csv"
    write_case_csv(rows, path)
    assert [p.name for p in path.parent.iterdir()] == ["cases.csv"]  # no temporary left behind
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        back = list(reader)
    assert len(back) == len(rows)
    for orig, got in zip(rows, back, strict=True):
        assert got["dataset"] == orig["dataset"] and got["case"] == orig["case"]
        assert got["organ"] == orig["organ"]
        assert float(got["dice"]) == orig["dice"]
        hd = float(got["hd95"])
        assert (math.isnan(hd) and math.isnan(orig["hd95"])) or hd == orig["hd95"]
        assert int(got["gt_voxels"]) == 10 and int(got["pred_voxels"]) == 12


def test_format_dice_table():
    table = format_dice_table(summarize(make_rows()), ["liver", "spleen", "kidney"])
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [" organ  ", " A     ", " B     "]
    body = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:6]}
    assert body == {
        "liver": ["0.800", "0.300"],
        "spleen": ["0.700", "-"],
        "kidney": ["-", "-"],
        "mean": ["0.750", "0.300"],
    }
    assert lines[-1].endswith(f"{(0.8 + 0.7 + 0.3) / 3:.3f}")
