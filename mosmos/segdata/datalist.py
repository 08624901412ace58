"""MSD folders and MONAI datalists: ``labels`` {"id": name} and ``training`` / ``test`` lists of paths.

Paths are relative to the JSON file's folder (or a given base folder); ``validation`` entries count
as training cases and ``testing`` as test cases, as MONAI's ``load_decathlon_datalist`` reads them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mosmos.errors import DataError, Problem
from mosmos.segdata.layouts import SegCase, as_label_id, drop_absent

_IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _strip_ending(name: str) -> str:
    """File name without folders and without its image ending (``.nii.gz``, ``.nii``, ...)."""
    base = os.path.basename(name)
    for ending in _IMAGE_ENDINGS:
        if base.lower().endswith(ending):
            return base[: -len(ending)]
    return Path(base).stem


def id_labels(where: Path | str, raw: Any, error: type[Exception] = DataError) -> dict[int, str]:
    """MSD ``labels`` {"id": name} (or, leniently, nnU-Net style {name: id}) -> {id: name}."""
    if not isinstance(raw, dict) or not raw:
        raise error(f"{where}: 'labels' must be a non-empty mapping {{id: name}}, e.g. {{1: spleen}}")
    if all(as_label_id(k) is None for k in raw) and all(as_label_id(v) is not None for v in raw.values()):
        raw = {v: k for k, v in raw.items()}  # {name: id}
    out: dict[int, str] = {}
    for key, name in raw.items():
        label_id = as_label_id(key)
        if label_id is None or label_id < 0:
            raise error(f"{where}: label id {key!r} is not a non-negative integer")
        if not isinstance(name, str) or not name.strip():
            raise error(f"{where}: label {key!r} needs a non-empty name, got {name!r}")
        if label_id in out:
            raise error(f"{where}: label id {label_id} is given twice")
        out[label_id] = name.strip()
    return out


def _list_entries(
    json_path: Path, data: dict[str, Any], keys: tuple[str, ...], base: Path, name: str, need_label: bool
) -> list[SegCase]:
    cases = []
    for key in keys:
        items = data.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            raise DataError(f"{json_path}: '{key}' must be a list, got {type(items).__name__}")
        for i, item in enumerate(items):
            image, label = (item, None) if isinstance(item, str) else (None, None)
            if isinstance(item, dict):
                image, label = item.get("image"), item.get("label")
            if isinstance(image, list):
                if len(image) != 1:
                    raise DataError(
                        f"{json_path}: {key}[{i}] lists {len(image)} image channels; multi-channel images "
                        "are not supported (mosmos reads one CT channel per case)"
                    )
                image = image[0]
            if not isinstance(image, str) or not image:
                raise DataError(f"{json_path}: {key}[{i}] needs an 'image' path, got {item!r}")
            if label is not None and not isinstance(label, str):
                raise DataError(f"{json_path}: {key}[{i}].label must be a path, got {label!r}")
            if need_label and not label:
                raise DataError(f"{json_path}: {key}[{i}] ({image}) has no 'label'; training cases need one")
            image_path = os.path.abspath(base / Path(image).expanduser())
            label_path = os.path.abspath(base / Path(label).expanduser()) if label else None
            cases.append(SegCase(_strip_ending(image), image_path, label_path, name))
    return cases


def read_datalist(
    json_path: Path, data: dict[str, Any], base: Path, name: str, problems: list[Problem] | None = None
) -> tuple[list[SegCase], list[SegCase]]:
    """The training (with validation) and test cases an MSD ``dataset.json`` or a datalist lists.

    Args:
        json_path: the JSON file, named in error messages.
        data: the loaded JSON.
        base: the folder relative paths start from.
        name: the dataset's name, recorded on each case.
        problems: when given, listed files that do not exist are appended here and their cases left
            out instead of raising.
    """
    modality = data.get("modality")
    if isinstance(modality, dict) and len(modality) > 1:
        raise DataError(
            f"{json_path}: multi-channel images (modality {modality}) are not supported; mosmos reads one "
            "CT channel per case"
        )
    if not isinstance(data.get("training"), list):
        raise DataError(f"{json_path}: 'training' must be a list of {{image, label}} entries")
    train = _list_entries(json_path, data, ("training", "validation"), base, name, need_label=True)
    if not train:
        raise DataError(f"{json_path}: the 'training' list is empty")
    test = _list_entries(json_path, data, ("test", "testing"), base, name, need_label=False)
    if problems is None:
        drop_absent(json_path, train + test, base, None)  # raises, listing every absent file
        return train, test
    return drop_absent(json_path, train, base, problems), drop_absent(json_path, test, base, problems)
