"""Byte-reproducible files: NIfTI (gzip without timestamp), JSON, the CT-RATE style report CSV,
and the nnU-Net v2 ``dataset.json``.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A ``.nii.gz`` file's bytes: same array and affine give the same bytes on every run.

    nibabel's own gzip writer stores a timestamp; compressing the serialised image ourselves
    with ``mtime=0`` (and no file name in the header) keeps outputs identical across runs.
    """
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    # Code 1 (scanner anatomical) for both forms, so every reader agrees on the geometry.
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b"mosmos synthetic phantom"
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(nifti_bytes(data, affine))


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_reports(path: Path, rows: list[dict[str, str]]) -> None:
    """The report table with CT-RATE's columns; quoting handles commas and quotes in the text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=["VolumeName", "Findings_EN", "Impressions_EN"], lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)


def dataset_json(name: str, labels: dict[str, int], num_training: int, description: str) -> dict:
    """nnU-Net v2 ``dataset.json`` for a CT dataset with ``.nii.gz`` files."""
    return {
        "name": name,
        "description": description,
        "reference": "mosmos synthetic abdominal CT phantoms (mosmos synth)",
        "licence": "CC0-1.0",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **labels},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }
