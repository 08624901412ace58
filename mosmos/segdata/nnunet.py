"""nnU-Net v2 raw datasets: ``labels`` {name: id}, imagesTr/CASE_0000 paired with labelsTr/CASE.

The training cases come from imagesTr/labelsTr, or from ``dataset.json``'s ``dataset`` key when it
lists them; imagesTs (with optional labelsTs) are the test cases. Region-based labels, the sparse
``ignore`` label and multi-channel images are refused with a message saying why.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mosmos.errors import DataError, Problem
from mosmos.segdata.layouts import SegCase, drop_absent, listing

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _nnunet_labels(where: Path, raw: Any) -> dict[int, str]:
    """nnU-Net v2 ``labels`` {name: id} -> {id: name}."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(
            f"{where}: 'labels' must be a non-empty mapping {{name: id}}, e.g. {{'background': 0}}"
        )
    regions = [name for name, v in raw.items() if isinstance(v, (list, tuple))]
    if regions:
        raise DataError(
            f"{where}: region-based labels ({listing([repr(r) for r in regions])} are lists of ids) are not "
            "supported; mosmos needs one integer id per label (convert the dataset to plain labels)"
        )
    out: dict[int, str] = {}
    for name, value in raw.items():
        label_id = value if isinstance(value, int) and not isinstance(value, bool) else None
        if label_id is None or label_id < 0:
            raise DataError(f"{where}: label {name!r} has id {value!r}; ids must be non-negative integers")
        if label_id in out:
            raise DataError(f"{where}: labels {out[label_id]!r} and {name!r} both have id {label_id}")
        if str(name).lower() == "ignore":
            raise DataError(
                f"{where}: the nnU-Net 'ignore' label (id {label_id}, sparse annotation) is not supported; "
                "mosmos needs every voxel annotated (unlabelled organs are handled per dataset instead)"
            )
        out[label_id] = str(name)
    return out


def _nnunet_channels(folder: Path, data: dict[str, Any]) -> None:
    channels = data.get("channel_names", data.get("modality"))
    if isinstance(channels, dict) and len(channels) > 1:
        raise DataError(
            f"{folder / 'dataset.json'}: multi-channel images (channel_names {channels}) are not supported; "
            "mosmos reads one CT channel per case (CASE_0000)"
        )


def _nnunet_split(
    folder: Path,
    images: str,
    labels: str,
    ending: str,
    name: str,
    required: bool,
    problems: list[Problem] | None = None,
) -> list[SegCase]:
    """Cases of imagesTr/labelsTr (``required``) or imagesTs/labelsTs. With ``problems``, images without
    labels and labels without images are recorded there (and left out) instead of raised."""
    image_dir, label_dir = folder / images, folder / labels
    if not image_dir.is_dir():
        if required:
            raise DataError(
                f"{folder}: no {images}/ folder; an nnU-Net v2 raw dataset keeps its training images in "
                f"{images}/CASE_0000{ending} and labels in {labels}/CASE{ending}"
            )
        return []
    files = sorted(f for f in image_dir.iterdir() if not f.name.startswith(".") and f.is_file())
    channels: dict[str, dict[str, Path]] = {}
    unnamed: list[str] = []
    for f in files:
        if not f.name.endswith(ending):
            continue
        m = _CHANNEL_RE.match(f.name[: -len(ending)])
        if m is None:
            unnamed.append(f.name)
            continue
        channels.setdefault(m["case"], {})[m["channel"]] = f
    if unnamed:
        raise DataError(
            f"{image_dir}: {listing(unnamed)} do not follow the nnU-Net naming CASE_0000{ending} "
            "(case identifier, '_', 4-digit channel index)"
        )
    multi = {c: sorted(ch) for c, ch in channels.items() if set(ch) != {"0000"}}
    if multi:
        case, chans = next(iter(multi.items()))
        raise DataError(
            f"{image_dir}: multi-channel images are not supported (case {case!r} has channel(s) "
            f"{', '.join(chans)}; {len(multi)} case(s) affected); mosmos reads one CT channel per case, "
            f"named CASE_0000{ending}"
        )
    if required and not channels:
        other = [f.name for f in files]
        hint = f"; found other files: {listing(other)} (is 'file_ending' right?)" if other else ""
        raise DataError(f"{image_dir}: no images named CASE_0000{ending}{hint}")
    if not label_dir.is_dir():
        if required:
            raise DataError(
                f"{folder}: no {labels}/ folder; every training image {images}/CASE_0000{ending} needs "
                f"a label map {labels}/CASE{ending}"
            )
        return [SegCase(case, str(ch["0000"]), None, name) for case, ch in sorted(channels.items())]
    label_files = {
        f.name[: -len(ending)]: f
        for f in label_dir.iterdir()
        if f.name.endswith(ending) and not f.name.startswith(".") and f.is_file()
    }
    missing = sorted(str(label_dir / f"{c}{ending}") for c in channels if c not in label_files)
    orphans = sorted(str(f) for c, f in label_files.items() if c not in channels)
    if problems is not None:
        for c, ch in sorted(channels.items()):
            if c not in label_files:
                problems.append(
                    Problem(str(ch["0000"]), f"no label map {labels}/{c}{ending} for this image", c, name)
                )
        for c, f in sorted(label_files.items()):
            if c not in channels:
                problems.append(
                    Problem(
                        str(f), f"label map without an image {images}/{c}_0000{ending} (extra file)", c, name
                    )
                )
        missing = orphans = []
    if missing or orphans:
        parts = []
        if missing:
            parts.append(f"{len(missing)} image(s) have no label file: missing {listing(missing)}")
        if orphans:
            parts.append(
                f"{len(orphans)} label file(s) have no image {images}/CASE_0000{ending}: {listing(orphans)}"
            )
        raise DataError(f"{folder}: " + "; ".join(parts))
    return [
        SegCase(c, str(ch["0000"]), str(label_files[c]), name)
        for c, ch in sorted(channels.items())
        if c in label_files
    ]


def _nnunet_explicit(
    folder: Path, json_path: Path, data: dict[str, Any], name: str, problems: list[Problem] | None = None
) -> list[SegCase]:
    """Training cases listed in dataset.json's ``dataset`` key (nnU-Net v2's alternative to imagesTr)."""
    listing = data["dataset"]
    if not isinstance(listing, dict) or not listing:
        raise DataError(f"{json_path}: 'dataset' must be a mapping {{case: {{images: [...], label: ...}}}}")
    cases = []
    for case, entry in listing.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
            raise DataError(f"{json_path}: dataset[{case!r}] needs 'images' (a list) and 'label' (a path)")
        images = entry.get("images")
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
            raise DataError(f"{json_path}: dataset[{case!r}].images must be a non-empty list of paths")
        if len(images) > 1:
            raise DataError(
                f"{json_path}: dataset[{case!r}] has {len(images)} image channels; multi-channel images "
                "are not supported (mosmos reads one CT channel per case)"
            )
        cases.append(
            SegCase(
                str(case), os.path.abspath(folder / images[0]), os.path.abspath(folder / entry["label"]), name
            )
        )
    return drop_absent(json_path, cases, folder, problems)


def read_nnunet(
    json_path: Path, data: dict[str, Any], name: str, problems: list[Problem] | None = None
) -> tuple[dict[int, str], list[SegCase], list[SegCase]]:
    """An nnU-Net v2 raw dataset's labels, training cases and test cases.

    Args:
        json_path: its ``dataset.json``; the case folders lie beside it.
        data: the loaded ``dataset.json``.
        name: the dataset's name, recorded on each case.
        problems: when given, case-level problems (unpaired files, a wrong ``numTraining``) are
            appended here and the cases left out instead of raising.

    Returns:
        ``({label id: name}, training cases, test cases)``, background included in the labels.
    """
    folder = json_path.parent
    labels = _nnunet_labels(json_path, data.get("labels"))
    ending = data.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DataError(
            f"{json_path}: 'file_ending' must be a file extension such as '.nii.gz', got {ending!r}"
        )
    _nnunet_channels(folder, data)
    if "dataset" in data:
        train = _nnunet_explicit(folder, json_path, data, name, problems)
    else:
        train = _nnunet_split(folder, "imagesTr", "labelsTr", ending, name, True, problems)
    test = _nnunet_split(folder, "imagesTs", "labelsTs", ending, name, False, problems)
    n = data.get("numTraining")
    if n is not None and problems is not None:
        found = len(train) + sum(p.case is not None and "labelsTr" in p.message for p in problems)
        if n != found:
            problems.append(
                Problem(
                    str(json_path),
                    f"'numTraining' is {n!r} but {found} training case(s) were found",
                    None,
                    name,
                )
            )
    elif n is not None and n != len(train):
        raise DataError(
            f"{json_path}: 'numTraining' is {n!r} but {len(train)} training case(s) were found; "
            "fix numTraining or add the missing cases"
        )
    return labels, train, test
