"""Small valid inputs (NIfTI volumes, an nnU-Net dataset, a report table) for tests to break one way each."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np

SHAPE = (10, 10, 6)


def nifti(path, data, zooms=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0)):
    """Save ``data`` as NIfTI with an axis-aligned affine of these voxel sizes and origin."""
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = origin
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_zooms(tuple(zooms) + tuple(img.header.get_zooms()[3:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def ct_image(seed=0):
    """A random int16 image in a soft-tissue HU range."""
    return np.random.default_rng(seed).integers(-150, 250, SHAPE).astype(np.int16)


def label_map():
    """Ids 1 and 2 in two boxes, the rest background."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:5, 2:5, 1:3] = 1
    lab[6:8, 6:8, 2:4] = 2
    return lab


def nnunet_dataset(root, cases=("a", "b", "c"), labels=None):
    """A valid nnU-Net v2 raw dataset: one image and label map per case."""
    labels = labels or {"background": 0, "liver": 1, "spleen": 2}
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": labels,
                "numTraining": len(cases),
                "file_ending": ".nii.gz",
            }
        )
    )
    for i, c in enumerate(cases):
        nifti(root / "imagesTr" / f"{c}_0000.nii.gz", ct_image(i))
        nifti(root / "labelsTr" / f"{c}.nii.gz", label_map())
    return root


def truncate(path):
    """Cut a file in half (a truncated gzip stream)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def report_table(tmp_path, rows=None, name="reports.csv"):
    """A CT-RATE style CSV whose rows (by default four valid ones) name images s0..s3 in tmp_path/images."""
    images = tmp_path / "images"
    for i in range(4):
        if not (images / f"s{i}.nii.gz").exists():
            nifti(images / f"s{i}.nii.gz", ct_image(i))
    rows = rows or [
        [f"s{i}.nii.gz", f"The liver is normal. Case {i}.", "No acute findings."] for i in range(4)
    ]
    path = tmp_path / name
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", "Findings_EN", "Impressions_EN"])
        w.writerows(rows)
    return path
