"""Recognising a segmentation dataset's layout, and the case record every layout's reader yields.

A path is an nnU-Net v2 raw folder, an MSD folder or ``dataset.json``, or a MONAI datalist JSON
(see :mod:`mosmos.segdata`); :func:`open_dataset` loads its JSON and says which. The readers of each
layout live in :mod:`mosmos.segdata.nnunet` and :mod:`mosmos.segdata.datalist`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mosmos.errors import DataError, Problem

SUPPORTED_LAYOUTS = (
    "supported layouts: (1) an nnU-Net v2 raw dataset folder (dataset.json with 'labels' "
    "{name: id}, imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz); (2) a Medical Segmentation "
    "Decathlon folder or its dataset.json ('labels' {\"id\": name} and a 'training' list of "
    "{image, label}); (3) a MONAI datalist .json file ('training' list of {image, label}, optional "
    "'validation', 'test'/'testing' and 'labels')"
)
_SHOWN = 5  # how many file names an error message lists


@dataclass(frozen=True)
class SegCase:
    """One image (and its label map, if any) of a segmentation dataset."""

    case_id: str  # nnU-Net: file name without _0000 and ending; MSD/datalist: image name without .nii(.gz)
    image: str  # absolute path
    label: str | None  # absolute path, None for unlabelled test cases
    dataset: str  # the dataset's name


def listing(items: list[Any], shown: int = _SHOWN) -> str:
    """``a, b, c`` or ``a, b, c and 7 more``."""
    head = ", ".join(str(i) for i in items[:shown])
    return head if len(items) <= shown else f"{head} and {len(items) - shown} more"


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def as_label_id(value: Any) -> int | None:
    """An int or an integer string (``"3"``), else None. Booleans are not label ids."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def _detect(json_path: Path, data: dict[str, Any], is_dir: bool) -> str:
    """Layout of a loaded dataset.json / datalist."""
    raw = data.get("labels")
    name_keys = isinstance(raw, dict) and bool(raw) and all(as_label_id(k) is None for k in raw)
    nnunet_keys = "channel_names" in data or "file_ending" in data
    if "training" not in data and (name_keys or nnunet_keys):
        return "nnunet"
    if "training" in data:
        if "modality" in data or is_dir or json_path.name == "dataset.json":
            return "msd"
        return "datalist"
    raise DataError(
        f"{json_path}: not a recognised segmentation dataset (no nnU-Net 'labels' {{name: id}} with "
        f"'channel_names'/'file_ending', and no 'training' list; keys: {sorted(data)}); {SUPPORTED_LAYOUTS}"
    )


def open_dataset(path: str | Path) -> tuple[str, Path, Path, dict[str, Any], str]:
    """``(layout, root, json_path, data, default name)`` for a dataset folder or JSON file."""
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise DataError(f"{root}: no such dataset folder or file; {SUPPORTED_LAYOUTS}")
    if root.is_dir():
        json_path = root / "dataset.json"
        if not json_path.is_file():
            raise DataError(f"{root}: no dataset.json in this folder; {SUPPORTED_LAYOUTS}")
    elif root.suffix.lower() == ".json":
        json_path = root
    else:
        raise DataError(f"{root}: not a dataset folder or a .json file; {SUPPORTED_LAYOUTS}")
    data = _load_json(json_path)
    layout = _detect(json_path, data, root.is_dir())
    if layout == "nnunet":
        name = json_path.parent.name
    elif isinstance(data.get("name"), str) and data["name"].strip():
        name = data["name"].strip()
    elif root.is_dir() or json_path.name == "dataset.json":
        name = json_path.parent.name
    else:
        name = json_path.stem
    return layout, root, json_path, data, name


def drop_absent(
    json_path: Path, cases: list[SegCase], base: Path, problems: list[Problem] | None
) -> list[SegCase]:
    """Cases whose listed files all exist; the others raise, or go to ``problems`` when it is given."""
    kept, absent = [], []
    for c in cases:
        gone = [p for p in (c.image, c.label) if p is not None and not os.path.isfile(p)]
        for p in gone:
            absent.append(p)
            if problems is not None:
                problems.append(
                    Problem(
                        p,
                        f"file listed in {json_path.name} (case {c.case_id!r}) not found",
                        c.case_id,
                        c.dataset,
                    )
                )
        if not gone:
            kept.append(c)
    if absent and problems is None:
        raise DataError(
            f"{json_path}: {len(absent)} listed file(s) not found (paths are relative to {base}): "
            f"{listing(absent)}"
        )
    return kept
