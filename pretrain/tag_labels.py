"""Label tables as organ tags: CT-RATE's 18 multi-abnormality labels, or any 0/1 table, per volume.

``data.labels_table`` names a CSV keyed by the image column (``VolumeName``) with one 0/1 column per
finding. Each finding is tied to the organs it lies in (:data:`CT_RATE_LABEL_ORGANS`, extended or
overridden by ``data.label_organs``), and a positive label marks its organ present and abnormal in
the report's tag matrix, so the organ's pixel-tag attention query learns it alongside the parsed tags.

Rules (docs/vocabulary.md):

- a finding tied to several organs (a right/left pair: "Lung nodule" -> both lungs) says that *at
  least one* of them is abnormal. When the parsed report already marks one of them abnormal (it
  named the side), the tags stay as parsed; otherwise every one of them is marked abnormal, as the
  parser does for a side-less statement ("pulmonary nodules"). An organ the report says is absent
  (pneumonectomy) is left out while another one remains;
- a negative label changes nothing: it rules out one finding, not every finding of the organ;
- a finding tied to no organ ("Medical material") is read and checked, but tags nothing.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mosmos.errors import ConfigError, DataError
from mosmos.table import volume_stem
from mosmos.vocabulary import Vocabulary

_LUNGS = ("lung_right", "lung_left")

#: CT-RATE's multi-abnormality labels (Hamamci et al., 2024) and the organs each lies in.
CT_RATE_LABEL_ORGANS: dict[str, tuple[str, ...]] = {
    "Medical material": (),  # devices, clips, tubes: no organ of their own
    "Arterial wall calcification": ("aorta",),
    "Cardiomegaly": ("heart",),
    "Pericardial effusion": ("heart",),
    "Coronary artery wall calcification": ("heart",),
    "Hiatal hernia": ("esophagus",),
    "Lymphadenopathy": ("mediastinal_lymph_nodes",),
    "Emphysema": _LUNGS,
    "Atelectasis": _LUNGS,
    "Lung nodule": _LUNGS,
    "Lung opacity": _LUNGS,
    "Pulmonary fibrotic sequela": _LUNGS,
    "Pleural effusion": _LUNGS,  # the pleura is where lung-adjacent findings lie
    "Mosaic attenuation pattern": _LUNGS,
    "Peribronchial thickening": _LUNGS,
    "Consolidation": _LUNGS,
    "Bronchiectasis": _LUNGS,
    "Interlobular septal thickening": _LUNGS,
}


def label_organs(overrides: Mapping[str, Sequence[str] | str] | None, vocabulary: Vocabulary) -> dict:
    """CT-RATE's label -> organs, with ``data.label_organs`` added or replacing entries.

    Raises:
        ConfigError: an override naming an organ that is not in the vocabulary.
    """
    table = dict(CT_RATE_LABEL_ORGANS)
    for label, organs in (overrides or {}).items():
        organs = [organs] if isinstance(organs, str) else list(organs or [])
        unknown = [o for o in organs if o not in vocabulary]
        if unknown:
            raise ConfigError(
                f"data.label_organs.{label}: {unknown} not in the vocabulary ({vocabulary.source}); "
                f"its organs are {', '.join(vocabulary.names)}"
            )
        table[str(label)] = tuple(organs)
    return table


def read_labels_table(path: str | Path, image_column: str, known: Mapping[str, Sequence[str]]) -> dict:
    """Read a label table: ``{case id: {label: 0 or 1}}``, the case id being the image file name
    without ``.nii``/``.nii.gz`` (as :func:`mosmos.table.read_report_table` names cases).

    Args:
        path: the CSV file.
        image_column: the key column (``data.image_column``).
        known: the label columns allowed (label -> organs); any other column is an error.

    Raises:
        DataError: a missing file or key column, an unknown column, a value other than 0/1, an
            empty or repeated key; every message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.labels_table: {path} not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"data.labels_table: {path} is not a readable UTF-8 CSV ({exc})") from None
    if image_column not in columns:
        raise DataError(
            f"data.labels_table: {path} has no key column {image_column!r} (data.image_column); "
            f"its columns are {columns}"
        )
    labels = [c for c in columns if c != image_column]
    unknown = [c for c in labels if c not in known]
    if unknown:
        raise DataError(
            f"data.labels_table: {path}: column(s) {unknown} are not known labels; tie each to its organs "
            f"with data.label_organs.<column>=[organ, ...] (known: {', '.join(known)})"
        )
    if not labels:
        raise DataError(f"data.labels_table: {path} has no label column besides {image_column!r}")
    out: dict[str, dict[str, int]] = {}
    for line, row in enumerate(rows, start=2):
        key = (row.get(image_column) or "").strip()
        if not key:
            raise DataError(f"data.labels_table: {path} line {line}: empty {image_column!r}")
        case = volume_stem(Path(key).name)
        if case in out:
            raise DataError(f"data.labels_table: {path} line {line}: {key!r} is listed twice")
        values = {}
        for label in labels:
            value = (row.get(label) or "").strip()
            try:
                number = float(value)
            except ValueError:
                number = None
            if number not in (0.0, 1.0):
                raise DataError(
                    f"data.labels_table: {path} line {line} ({key}): {label}={value!r} is not 0 or 1"
                )
            values[label] = int(number)
        out[case] = values
    return out


def apply_labels(
    tags: np.ndarray,
    case_ids: Sequence[str],
    table: Mapping[str, Mapping[str, int]],
    organs_of: Mapping[str, Sequence[str]],
    vocabulary: Vocabulary,
    source: str = "data.labels_table",
) -> np.ndarray:
    """The tag matrix with each case's positive labels marking their organs abnormal (rules above).

    Args:
        tags: ``[N, n_organs, 2]`` parsed tags, in ``vocabulary`` order.
        case_ids: the case whose labels fill row i (after any report shuffling: the labels follow the
            report, never the image, so the shuffled-report control gets no true label).
        table: from :func:`read_labels_table`.
        organs_of: label -> organs; organs missing from ``vocabulary`` (a subset) are skipped.
        source: named in errors.

    Raises:
        DataError: a case without a row in the table.
    """
    missing = [c for c in case_ids if c not in table]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} case(s) of data.table have no row (first: {missing[:3]}); "
            "every image needs its labels"
        )
    out = np.array(tags, dtype=np.int8, copy=True)
    index = {name: i for i, name in enumerate(vocabulary.names)}
    for row, case in enumerate(case_ids):
        for label, value in table[case].items():
            organs = [index[o] for o in organs_of.get(label, ()) if o in index]
            if value != 1 or not organs:
                continue
            candidates = [i for i in organs if out[row, i, 0] != 0] or organs
            if any(out[row, i, 1] == 1 for i in candidates):
                continue
            for i in candidates:
                out[row, i] = (1, 1)
    return out


__all__ = ["CT_RATE_LABEL_ORGANS", "apply_labels", "label_organs", "read_labels_table"]
