"""A segmentation dataset: its cases and its labels mapped to the organ vocabulary.

:func:`read_seg_dataset` opens any supported layout (see :mod:`mosmos.segdata`), lists its cases
without reading a voxel, and maps its label names to vocabulary organs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mosmos.errors import ConfigError, DataError, Problem
from mosmos.segdata.datalist import id_labels, read_datalist
from mosmos.segdata.label_mapping import map_labels
from mosmos.segdata.layouts import SegCase, listing, open_dataset
from mosmos.segdata.nnunet import read_nnunet
from mosmos.vocabulary import Vocabulary


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


def _foreground(labels: dict[int, str]) -> dict[int, str]:
    return {i: n for i, n in sorted(labels.items()) if i != 0}


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
                        f"duplicate case id {case.case_id!r} (also {seen[case.case_id].image}); which file "
                        "is right is ambiguous, so the case is left out",
                        case.case_id,
                        case.dataset,
                    )
                )
        else:
            seen[case.case_id] = case
    if dups and problems is None:
        raise DataError(
            f"{root}: duplicate case id(s) {listing(dups, 3)}; case ids (image file names without the "
            "ending) must be unique within a dataset"
        )
    return later


def seg_dataset_name(path: str | Path) -> str:
    """The name :func:`read_seg_dataset` would give the dataset at ``path``, without mapping its labels.

    Use it to find a dataset's per-dataset config keys (``data.label_map.<name>`` ...) before reading it.
    """
    return open_dataset(path)[4]


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

    No voxel data is read; see :func:`mosmos.check.datasets.check_label_values`
    for a label map's contents.

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
    layout, root, json_path, data, default_name = open_dataset(path)
    ds_name = name or default_name
    if layout == "nnunet":
        own, train, test = read_nnunet(json_path, data, ds_name, problems)
    else:
        base = Path(base_dir).expanduser().resolve() if base_dir is not None else json_path.parent
        train, test = read_datalist(json_path, data, base, ds_name, problems)
        own = id_labels(json_path, data["labels"]) if data.get("labels") is not None else None
    if labels is not None:
        own = id_labels(f"data.labels.{ds_name}", labels, error=ConfigError)
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
    # imagesTr and imagesTs are separate sets (nnU-Net): a test case may reuse a training case's id,
    # as some public releases do; within one set an id must be unique
    later_train = _check_duplicates(root, train, problems)
    later_test = _check_duplicates(root, test, problems)
    train = [c for i, c in enumerate(train) if i not in later_train]
    test = [c for i, c in enumerate(test) if i not in later_test]
    label_to_organ, ignored = {}, {}
    if vocab is not None:
        label_to_organ, ignored = map_labels(str(root), ds_name, foreground, vocab, label_map, ignore)
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
    label_to_organ, ignored = map_labels(dataset.root, dataset.name, dataset.labels, vocab, label_map, ignore)
    return dataclasses.replace(
        dataset, label_to_organ=label_to_organ, ignored=ignored, vocab_order=list(vocab.names)
    )
