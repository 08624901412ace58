"""Report tables: one row per CT volume, an image path column and one or more report text columns.

CT-RATE ships a CSV with ``VolumeName``, ``Findings_EN`` and ``Impressions_EN``; any CSV, TSV, JSON
Lines, JSON (a list of records) or Parquet file with an image column and report columns named in the
config works the same way. Files are read with Hugging Face ``datasets`` into a temporary cache, so
nothing is written next to the user's data.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from mosmos.errors import DataError

log = logging.getLogger(__name__)

# extension -> (datasets builder, extra builder kwargs)
_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}
# Known report column names -> section header; other columns are upper-cased.
_SECTION_NAMES = {"findings": "FINDINGS", "impressions": "IMPRESSION", "impression": "IMPRESSION"}
# CT-RATE volume names encode their folder: train_12_a_1.nii.gz lives in train/train_12/train_12_a/.
_CTRATE_NAME = re.compile(r"^(?P<split>[a-z]+)_(?P<patient>\d+)_(?P<scan>[a-z]+)_\d+\.nii(\.gz)?$")


def volume_stem(name: str) -> str:
    """File name without folders and without ``.nii.gz`` / ``.nii`` (any other last suffix dropped too)."""
    base = Path(name).name
    for suffix in (".nii.gz", ".nii"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return Path(base).stem


def section_name(column: str) -> str:
    """Header for a report column: ``Findings_EN`` -> ``FINDINGS``, ``Impressions_EN`` -> ``IMPRESSION``."""
    key = re.sub(r"_(en|EN)$", "", column).lower()
    return _SECTION_NAMES.get(key, key.replace("_", " ").upper())


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _load(path: Path) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise DataError(
            f"{path}: unsupported report table format {suffix or '(no extension)'!r}; "
            f"supported: {', '.join(sorted(_FORMATS))}"
        )
    builder, kwargs = _FORMATS[suffix]
    kwargs = dict(kwargs)
    if builder == "csv":
        # Read every column as text (a volume name "0012" must not become 12), and only an empty
        # cell as missing (pandas would otherwise turn report text such as "NA" into NaN).
        try:
            with path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f, delimiter=kwargs.get("delimiter", ",")), None)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: cannot read the table header: {e}") from None
        if not header:
            raise DataError(f"{path}: empty table (no header row)")
        kwargs.update(
            features=datasets.Features({c: datasets.Value("string") for c in header}),
            keep_default_na=False,
            na_values=[""],
        )
    bars_were_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="mosmos-table-") as tmp:
            return datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=tmp, keep_in_memory=True, **kwargs
            )
    except Exception as e:  # pyarrow / pandas / datasets raise many types for malformed files
        raise DataError(f"{path}: cannot read as {builder.upper()}: {type(e).__name__}: {e}") from None
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()


def resolve_image_path(value: str, image_root: Path) -> Path:
    """``image_root / value``; for a bare CT-RATE volume name that is not there, its nested folder."""
    flat = image_root / value
    m = _CTRATE_NAME.match(value)
    if flat.exists() or m is None:
        return flat
    sub = Path(f"{m['split']}_{m['patient']}") / f"{m['split']}_{m['patient']}_{m['scan']}" / value
    for candidate in (image_root / m["split"] / sub, image_root / sub):
        if candidate.exists():
            return candidate
    return flat


def read_report_table(
    path: str | Path,
    image_column: str = "VolumeName",
    report_columns: Sequence[str] = ("Findings_EN", "Impressions_EN"),
    image_root: str | Path | None = None,
    check_images: bool = True,
) -> list[dict[str, Any]]:
    """Read an image–report table into a list of records.

    Args:
        path: ``.csv``, ``.tsv``, ``.jsonl``, ``.json`` (list of records) or ``.parquet``.
        image_column: column holding each volume's path or file name.
        report_columns: text columns joined into the report, in this order.
        image_root: folder the image values are relative to; default the table's folder. Absolute
            values are kept. Bare CT-RATE names (``train_1_a_1.nii.gz``) are also looked up in
            CT-RATE's nested layout (``[train/]train_1/train_1_a/``).
        check_images: raise if any image file does not exist (fail before training, not mid-epoch).

    Returns:
        One dict per usable row: ``case_id`` (image file name without ``.nii``/``.nii.gz``), ``image``
        (absolute path, str), ``report`` (``"FINDINGS: ...\\nIMPRESSION: ..."``, empty columns skipped;
        a single report column is used as is) and ``row`` (0-based data row in the table). Rows whose
        report columns are all empty are dropped with a warning.

    Raises:
        DataError: missing file, unsupported format, missing columns, rows without an image value,
            all reports empty, or (``check_images``) image files not found.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"report table not found: {path}")
    report_columns = [report_columns] if isinstance(report_columns, str) else list(report_columns)
    if not report_columns:
        raise DataError(f"{path}: no report columns given")
    table = _load(path)
    columns = table.column_names
    missing = [c for c in [image_column, *report_columns] if c not in columns]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found; the table has columns {columns}")

    root = Path(image_root).expanduser().resolve() if image_root is not None else path.parent
    images = table[image_column]
    texts = {c: table[c] for c in report_columns}
    records: list[dict[str, Any]] = []
    no_image: list[int] = []
    no_report: list[int] = []
    for row, value in enumerate(images):
        value = _text(value)
        if not value:
            no_image.append(row)
            continue
        parts = [(c, _text(texts[c][row])) for c in report_columns]
        parts = [(c, t) for c, t in parts if t]
        if not parts:
            no_report.append(row)
            continue
        if len(report_columns) == 1:
            report = parts[0][1]
        else:
            report = "\n".join(f"{section_name(c)}: {t}" for c, t in parts)
        image = Path(value).expanduser()
        image = image if image.is_absolute() else resolve_image_path(value, root)
        records.append({"case_id": volume_stem(value), "image": str(image), "report": report, "row": row})

    if no_image:
        raise DataError(
            f"{path}: {len(no_image)} row(s) have no value in column {image_column!r} "
            f"(0-based data rows {no_image[:10]}{' ...' if len(no_image) > 10 else ''})"
        )
    if not records:
        raise DataError(f"{path}: every report is empty in column(s) {report_columns} ({len(images)} rows)")
    if no_report:
        log.warning(
            "%s: dropped %d row(s) with empty %s (0-based data rows %s%s)",
            path,
            len(no_report),
            report_columns,
            no_report[:10],
            " ..." if len(no_report) > 10 else "",
        )
    if check_images:
        absent = [r["image"] for r in records if not Path(r["image"]).is_file()]
        if absent:
            raise DataError(
                f"{path}: {len(absent)} of {len(records)} image file(s) not found under {root} "
                f"(first: {absent[:3]}); set data.image_root to the folder holding the volumes"
            )
    return records
