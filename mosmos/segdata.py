"""Partially labelled segmentation datasets: nnU-Net v2 raw folders, MSD folders and MONAI datalists.

Each dataset names its labels its own way. :func:`read_seg_dataset` lists a dataset's cases (without
reading any voxel) and maps its label names to the organ vocabulary: an explicit per-dataset
``label_map`` wins, otherwise the vocabulary's label spellings (``configs/organs.yaml``) decide. A label
that maps to nothing is an error unless the config ignores it.

Supported layouts::

    nnU-Net v2 raw     Dataset011_Name/dataset.json  {"labels": {"background": 0, "spleen": 1}, ...}
                       Dataset011_Name/imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz
                       optional imagesTs/ (+ labelsTs/)
    MSD                Task09_Spleen/dataset.json    {"labels": {"0": "background", "1": "spleen"},
                       "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}],
                       "test": ["./imagesTs/y.nii.gz"], "modality": {"0": "CT"}}
    MONAI datalist     any.json with "training" (and optional "validation", "test"/"testing") lists
                       of {"image", "label"}; "labels" optional (else given by the config)
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mosmos.errors import ConfigError, DataError, Problem
from mosmos.vocabulary import Vocabulary, normalize_label_name

LAYOUTS = ("nnunet", "msd", "datalist")
SUPPORTED_LAYOUTS = (
    "supported layouts: (1) an nnU-Net v2 raw dataset folder (dataset.json with 'labels' "
    "{name: id}, imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz); (2) a Medical Segmentation "
    "Decathlon folder or its dataset.json ('labels' {\"id\": name} and a 'training' list of "
    "{image, label}); (3) a MONAI datalist .json file ('training' list of {image, label}, optional "
    "'validation', 'test'/'testing' and 'labels')"
)
_IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_SHOWN = 5  # how many file names an error message lists


@dataclass(frozen=True)
class SegCase:
    """One image (and its label map, if any) of a segmentation dataset."""

    case_id: str  # nnU-Net: file name without _0000 and ending; MSD/datalist: image name without .nii(.gz)
    image: str  # absolute path
    label: str | None  # absolute path, None for unlabelled test cases
    dataset: str  # the dataset's name


@dataclass
class SegDataset:
    """A dataset's cases and how its label ids map to vocabulary organs."""

    name: str  # nnU-Net folder name ("Dataset011_AbdomenA"), MSD "name" field, or the file/folder stem
    root: str  # the directory or JSON file it came from
    layout: str  # "nnunet" | "msd" | "datalist"
    labels: dict[int, str]  # the dataset's own label ids -> names, background (0) excluded
    label_to_organ: dict[int, str]  # label id -> canonical vocabulary organ, for mapped labels
    ignored: dict[int, str]  # label ids the config ignores: voxels become background, organ unlabelled
    train: list[SegCase]
    test: list[SegCase]
    vocab_order: list[str] = field(default_factory=list, repr=False, compare=False)  # vocabulary organs

    @property
    def organs(self) -> list[str]:
        """Canonical organs this dataset labels, in vocabulary order."""
        mapped = set(self.label_to_organ.values())
        ordered = [o for o in self.vocab_order if o in mapped]
        return ordered + sorted(mapped - set(ordered))

    def lookup_table(self, organs: list[str]) -> np.ndarray:
        """Map this dataset's label ids to output channels.

        Args:
            organs: the model's organs, in channel order.

        Returns:
            A ``uint8`` array of size ``max label id + 1``: ``lut[id]`` is ``1 + organs.index(organ)``
            for a mapped label whose organ is in ``organs``, and 0 for background, ignored labels and
            organs not in ``organs``.
        """
        if len(organs) > 254:
            raise ConfigError(f"{len(organs)} organs do not fit a uint8 label map (at most 254)")
        lut = np.zeros(max(self.labels, default=0) + 1, dtype=np.uint8)
        for label_id, organ in self.label_to_organ.items():
            if organ in organs:
                lut[label_id] = organs.index(organ) + 1
        return lut


# ---------------------------------------------------------------------------------------------------
# small helpers


def _listing(items: list[Any], shown: int = _SHOWN) -> str:
    """``a, b, c`` or ``a, b, c and 7 more``."""
    head = ", ".join(str(i) for i in items[:shown])
    return head if len(items) <= shown else f"{head} and {len(items) - shown} more"


def _strip_ending(name: str) -> str:
    """File name without folders and without its image ending (``.nii.gz``, ``.nii``, ...)."""
    base = os.path.basename(name)
    for ending in _IMAGE_ENDINGS:
        if base.lower().endswith(ending):
            return base[: -len(ending)]
    return Path(base).stem


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


def _as_int(value: Any) -> int | None:
    """An int or an integer string (``"3"``), else None. Booleans are not label ids."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


def _foreground(labels: dict[int, str]) -> dict[int, str]:
    return {i: n for i, n in sorted(labels.items()) if i != 0}


# ---------------------------------------------------------------------------------------------------
# labels


def _nnunet_labels(where: Path, raw: Any) -> dict[int, str]:
    """nnU-Net v2 ``labels`` {name: id} -> {id: name}."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(
            f"{where}: 'labels' must be a non-empty mapping {{name: id}}, e.g. {{'background': 0}}"
        )
    regions = [name for name, v in raw.items() if isinstance(v, (list, tuple))]
    if regions:
        raise DataError(
            f"{where}: region-based labels ({_listing([repr(r) for r in regions])} are lists of ids) are not supported; "
            "mosmos needs one integer id per label (convert the dataset to plain labels)"
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


def _id_labels(where: Path | str, raw: Any, error: type[Exception] = DataError) -> dict[int, str]:
    """MSD ``labels`` {"id": name} (or, leniently, nnU-Net style {name: id}) -> {id: name}."""
    if not isinstance(raw, dict) or not raw:
        raise error(f"{where}: 'labels' must be a non-empty mapping {{id: name}}, e.g. {{1: spleen}}")
    if all(_as_int(k) is None for k in raw) and all(_as_int(v) is not None for v in raw.values()):
        raw = {v: k for k, v in raw.items()}  # {name: id}
    out: dict[int, str] = {}
    for key, name in raw.items():
        label_id = _as_int(key)
        if label_id is None or label_id < 0:
            raise error(f"{where}: label id {key!r} is not a non-negative integer")
        if not isinstance(name, str) or not name.strip():
            raise error(f"{where}: label {key!r} needs a non-empty name, got {name!r}")
        if label_id in out:
            raise error(f"{where}: label id {label_id} is given twice")
        out[label_id] = name.strip()
    return out


def _closest_organs(vocab: Vocabulary, text: str, n: int = 3) -> list[str]:
    """Vocabulary organs whose names or spellings look like ``text``."""
    spellings: dict[str, str] = {}
    for organ in vocab.organs:
        for spelling in (organ.name, organ.display, *organ.label_names, *organ.synonyms):
            spellings.setdefault(normalize_label_name(spelling), organ.name)
    matches = difflib.get_close_matches(normalize_label_name(text), list(spellings), n=20, cutoff=0.6)
    out: list[str] = []
    for m in matches:
        if spellings[m] not in out:
            out.append(spellings[m])
    return out[:n]


def _suggest(vocab: Vocabulary, text: str) -> str:
    close = _closest_organs(vocab, text)
    if close:
        return f"closest organs: {', '.join(close)}"
    return f"the vocabulary's organs are: {', '.join(vocab.names)}"


def _resolve_organ(vocab: Vocabulary, spec: str) -> str | None:
    """Canonical organ for a config value: a canonical name, a label spelling or a report synonym."""
    if spec in vocab:
        return spec
    hit = vocab.lookup_label(spec)
    if hit is not None:
        return hit
    phrase = " ".join(spec.lower().split())
    for organ in vocab.organs:
        if phrase in organ.synonyms:
            return organ.name
    return None


def _find_label(labels: dict[int, str], key: str) -> int | None:
    """Label id named ``key``: an exact name, else a unique spelling-insensitive match."""
    exact = [i for i, n in labels.items() if n == key]
    if len(exact) == 1:
        return exact[0]
    loose = [i for i, n in labels.items() if normalize_label_name(n) == normalize_label_name(key)]
    return loose[0] if len(loose) == 1 else None


def _map_labels(
    root: str,
    ds_name: str,
    labels: dict[int, str],
    vocab: Vocabulary,
    label_map: dict[str, str] | None,
    ignore: list[str] | None,
) -> tuple[dict[int, str], dict[int, str]]:
    """Returns ``(label_to_organ, ignored)``."""
    names = [f"{n!r} (id {i})" for i, n in labels.items()]
    explicit: dict[int, str] = {}
    if label_map is not None:
        if not isinstance(label_map, dict):
            raise ConfigError(
                f"data.label_map.{ds_name} must be a mapping {{dataset label name: organ}}, "
                f"got {type(label_map).__name__}"
            )
        for key, spec in label_map.items():
            label_id = _find_label(labels, str(key))
            if label_id is None:
                raise ConfigError(
                    f"data.label_map.{ds_name}: {key!r} is not a label of {root}; its labels are {', '.join(names)}"
                )
            if not isinstance(spec, str) or not spec.strip():
                raise ConfigError(f"data.label_map.{ds_name}.{key} must be an organ name, got {spec!r}")
            organ = _resolve_organ(vocab, spec.strip())
            if organ is None:
                raise ConfigError(
                    f"data.label_map.{ds_name}.{key}: {spec!r} is not an organ of {vocab.source}; "
                    f"{_suggest(vocab, spec)}"
                )
            explicit[label_id] = organ
    ignored: dict[int, str] = {}
    if ignore is not None:
        if isinstance(ignore, str) or not isinstance(ignore, (list, tuple)):
            raise ConfigError(
                f"data.ignore_labels.{ds_name} must be a list of label names, got {type(ignore).__name__}"
            )
        for key in ignore:
            label_id = _find_label(labels, str(key))
            if label_id is None:
                raise ConfigError(
                    f"data.ignore_labels.{ds_name}: {key!r} is not a label of {root}; "
                    f"its labels are {', '.join(names)}"
                )
            if label_id in explicit:
                raise ConfigError(
                    f"{root}: label {labels[label_id]!r} (id {label_id}) is both mapped by "
                    f"data.label_map.{ds_name} and ignored by data.ignore_labels.{ds_name}; keep one"
                )
            ignored[label_id] = labels[label_id]

    mapped: dict[int, str] = {}
    unmapped: list[int] = []
    for label_id, name in labels.items():
        if label_id in ignored:
            continue
        organ = explicit.get(label_id) or vocab.lookup_label(name)
        if organ is None:
            unmapped.append(label_id)
        else:
            mapped[label_id] = organ
    if unmapped:
        first = unmapped[0]
        name = labels[first]
        msg = (
            f"{root}: label {name!r} (id {first}) does not match any organ in {vocab.source}; map it with "
            f"data.label_map.{ds_name}.{name}=<organ> or ignore it with data.ignore_labels.{ds_name}=[{name}]"
            f"; {_suggest(vocab, name)}"
        )
        if len(unmapped) > 1:
            others = ", ".join(f"{labels[i]!r} (id {i})" for i in unmapped[1:])
            msg += f". Also unmapped: {others}"
        raise ConfigError(msg)
    by_organ: dict[str, list[int]] = {}
    for label_id, organ in mapped.items():
        by_organ.setdefault(organ, []).append(label_id)
    clashes = {o: ids for o, ids in by_organ.items() if len(ids) > 1}
    if clashes:
        organ, ids = next(iter(clashes.items()))
        which = " and ".join(f"{labels[i]!r} (id {i})" for i in ids)
        raise ConfigError(
            f"{root}: labels {which} all map to organ {organ!r}; map all but one elsewhere with "
            f"data.label_map.{ds_name}.<label>=<organ> or ignore them with data.ignore_labels.{ds_name}"
        )
    return mapped, ignored


# ---------------------------------------------------------------------------------------------------
# layouts


def _detect(json_path: Path, data: dict[str, Any], is_dir: bool) -> str:
    """Layout of a loaded dataset.json / datalist."""
    raw = data.get("labels")
    name_keys = isinstance(raw, dict) and bool(raw) and all(_as_int(k) is None for k in raw)
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


def _open(path: str | Path) -> tuple[str, Path, Path, dict[str, Any], str]:
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
            f"{image_dir}: {_listing(unnamed)} do not follow the nnU-Net naming CASE_0000{ending} "
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
        hint = f"; found other files: {_listing(other)} (is 'file_ending' right?)" if other else ""
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
            parts.append(f"{len(missing)} image(s) have no label file: missing {_listing(missing)}")
        if orphans:
            parts.append(
                f"{len(orphans)} label file(s) have no image {images}/CASE_0000{ending}: {_listing(orphans)}"
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
    return _drop_absent(json_path, cases, folder, problems)


def _drop_absent(
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
            f"{_listing(absent)}"
        )
    return kept


def _read_nnunet(
    root: Path, json_path: Path, data: dict[str, Any], name: str, problems: list[Problem] | None = None
) -> tuple[dict[int, str], list[SegCase], list[SegCase]]:
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


def _read_list(
    json_path: Path, data: dict[str, Any], base: Path, name: str, problems: list[Problem] | None = None
) -> tuple[list[SegCase], list[SegCase]]:
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
        _drop_absent(json_path, train + test, base, None)  # raises, listing every absent file
        return train, test
    return _drop_absent(json_path, train, base, problems), _drop_absent(json_path, test, base, problems)


def _check_duplicates(root: Path, cases: list[SegCase], problems: list[Problem] | None = None) -> set[int]:
    """Raise on duplicate case ids, or (with ``problems``) record them and return the positions of the
    later copies, which the caller drops."""
    seen: dict[str, SegCase] = {}
    dups: list[str] = []
    later: set[int] = set()
    for i, case in enumerate(cases):
        if case.case_id in seen:
            dups.append(f"{case.case_id!r} ({seen[case.case_id].image} and {case.image})")
            later.add(i)
            if problems is not None:
                problems.append(
                    Problem(
                        case.image,
                        f"duplicate case id {case.case_id!r} (also {seen[case.case_id].image}); which file is "
                        "right is ambiguous, so the case is left out",
                        case.case_id,
                        case.dataset,
                    )
                )
        else:
            seen[case.case_id] = case
    if problems is not None:
        return later
    if dups:
        raise DataError(
            f"{root}: duplicate case id(s) {_listing(dups, 3)}; case ids (image file names without the "
            "ending) must be unique within a dataset"
        )


# ---------------------------------------------------------------------------------------------------
# public API


def seg_dataset_name(path: str | Path) -> str:
    """The name :func:`read_seg_dataset` would give the dataset at ``path``, without mapping its labels.

    Use it to find a dataset's per-dataset config keys (``data.label_map.<name>`` ...) before reading it.
    """
    return _open(path)[4]


def read_seg_dataset(
    path: str | Path,
    vocab: Vocabulary | None,
    label_map: dict[str, str] | None = None,
    ignore: list[str] | None = None,
    labels: dict[int, str] | None = None,
    name: str | None = None,
    *,
    base_dir: str | Path | None = None,
    problems: list[Problem] | None = None,
) -> SegDataset:
    """List a segmentation dataset's cases and map its labels to the vocabulary.

    No voxel data is read; see :func:`check_label_values` for a label map's contents.

    Args:
        path: an nnU-Net v2 raw dataset folder, an MSD folder, or a dataset.json / datalist JSON file.
        vocab: the organ vocabulary; ``None`` lists the cases and labels without mapping them to
            organs (``label_to_organ`` stays empty; see :func:`map_dataset_labels`).
        label_map: dataset label name -> organ (canonical name, label spelling or synonym); wins over
            the vocabulary's spellings.
        ignore: dataset label names to drop (voxels become background, the organ counts as unlabelled).
        labels: label ids -> names, for datalists that do not declare ``labels`` (wins over the file's).
        name: the dataset's name (default: nnU-Net folder name, MSD/datalist ``name`` field, or the
            folder / file stem).
        base_dir: folder that MSD / datalist paths are relative to (default: the JSON file's folder).
        problems: when given, problems that concern single cases (images without labels and labels
            without images, listed files that do not exist, duplicate case ids, a wrong numTraining) are
            appended here and the cases left out, instead of raising; ``mosmos check`` and runs with
            ``data.on_bad_case=skip`` use this. Problems with the dataset as a whole still raise.

    Returns:
        The dataset, its cases sorted by case id.

    Raises:
        DataError: missing or malformed files, unsupported layouts (region labels, multi-channel
            images), images without labels or labels without images, duplicate case ids.
        ConfigError: labels that map to no organ and are not ignored, two labels on one organ,
            ``label_map`` / ``ignore`` keys that are not labels of the dataset, missing label names.
    """
    layout, root, json_path, data, default_name = _open(path)
    ds_name = name or default_name
    if layout == "nnunet":
        own, train, test = _read_nnunet(root, json_path, data, ds_name, problems)
    else:
        base = Path(base_dir).expanduser().resolve() if base_dir is not None else json_path.parent
        train, test = _read_list(json_path, data, base, ds_name, problems)
        own = _id_labels(json_path, data["labels"]) if data.get("labels") is not None else None
    if labels is not None:
        own = _id_labels(f"data.labels.{ds_name}", labels, error=ConfigError)
    if own is None:
        raise ConfigError(
            f"{json_path}: the {layout} JSON declares no 'labels'; name its label ids with "
            f"data.labels.{ds_name}={{1: spleen, 2: liver, ...}}"
        )
    foreground = _foreground(own)
    if not foreground:
        raise DataError(f"{json_path}: declares no foreground labels (only background); nothing to segment")
    train.sort(key=lambda c: c.case_id)
    test.sort(key=lambda c: c.case_id)
    later = _check_duplicates(root, train + test, problems)
    if later:
        n_train = len(train)
        train = [c for i, c in enumerate(train) if i not in later]
        test = [c for i, c in enumerate(test, start=n_train) if i not in later]
    label_to_organ, ignored = {}, {}
    if vocab is not None:
        label_to_organ, ignored = _map_labels(str(root), ds_name, foreground, vocab, label_map, ignore)
    return SegDataset(
        name=ds_name,
        root=str(root),
        layout=layout,
        labels=foreground,
        label_to_organ=label_to_organ,
        ignored=ignored,
        train=train,
        test=test,
        vocab_order=list(vocab.names) if vocab is not None else [],
    )


def map_dataset_labels(
    dataset: SegDataset,
    vocab: Vocabulary,
    label_map: dict[str, str] | None = None,
    ignore: list[str] | None = None,
) -> SegDataset:
    """``dataset`` with its labels mapped to ``vocab`` (for one listed with ``vocab=None``).

    Raises:
        ConfigError: as :func:`read_seg_dataset` does for labels that map to no organ.
    """
    import dataclasses

    label_to_organ, ignored = _map_labels(
        dataset.root, dataset.name, dataset.labels, vocab, label_map, ignore
    )
    return dataclasses.replace(
        dataset, label_to_organ=label_to_organ, ignored=ignored, vocab_order=list(vocab.names)
    )


def check_label_values(case: SegCase, dataset: SegDataset) -> None:
    """Load ``case``'s label map and check its voxels against the dataset's declared labels.

    The checks are :mod:`mosmos.check`'s (what ``mosmos check`` reports); this raises the first
    problem with the label map itself.

    Raises:
        DataError: naming the file, when it cannot be read, is not 3D, does not match its image's
            shape, holds non-integer values, or holds ids the dataset does not declare.
    """
    if case.label is None:
        return
    from mosmos.check import check_cases, dataset_case_files  # deferred: it reads voxels

    for problem in check_cases(dataset_case_files(dataset, [case])):
        if problem.severity == "error" and problem.path == case.label:
            raise DataError(str(problem))
