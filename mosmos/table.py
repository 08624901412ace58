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

from mosmos.errors import DataError, Problem

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


def _utf8_errors(path: Path, limit: int = 20) -> list[tuple[int, int, int]]:
    """(1-based line, 1-based byte column, byte) of up to ``limit`` lines that are not valid UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        return []
    except UnicodeDecodeError:
        pass
    out = []
    for n, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append((n, e.start + 1, line[e.start]))
            if len(out) >= limit:
                break
    return out


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
    problems: list[Problem] | None = None,
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
        problems: when given, problems with single rows (no image value, an empty report, a duplicate
            case id, an image file not found, a line that is not UTF-8) are appended here and those rows
            left out instead of raising or warning; ``mosmos check`` and ``data.on_bad_case=skip`` use
            this. Problems with the table as a whole (unreadable, missing columns) still raise.

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
    bad_lines = _utf8_errors(path) if path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json") else []
    if bad_lines and problems is None:
        where = ", ".join(f"line {n} byte {c} (0x{b:02x})" for n, c, b in bad_lines[:5])
        raise DataError(
            f"{path}: not valid UTF-8 at {where}; re-save the table as UTF-8 (run `mosmos check {path}` "
            "for every bad line)"
        )
    if bad_lines:
        for n, c, b in bad_lines:
            problems.append(
                Problem(
                    str(path),
                    f"line {n}: byte {c} (0x{b:02x}) is not valid UTF-8; shown as U+FFFD",
                    None,
                    path.name,
                )
            )
        with tempfile.TemporaryDirectory(prefix="mosmos-utf8-") as tmp:
            clean = Path(tmp) / path.name
            clean.write_text(path.read_bytes().decode("utf-8", errors="replace"), encoding="utf-8")
            table = _load(clean)
    else:
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
    first_row: dict[str, int] = {}
    duplicates: list[str] = []

    def problem(where: str, message: str, case: str | None) -> None:
        if problems is not None:
            problems.append(Problem(where, message, case, path.name))

    for row, value in enumerate(images):
        value = _text(value)
        if not value:
            no_image.append(row)
            problem(str(path), f"row {row}: no image in column {image_column!r}", f"row {row}")
            continue
        case_id = volume_stem(value)
        if case_id in first_row:
            duplicates.append(f"{case_id!r} (rows {first_row[case_id]} and {row})")
            problem(
                str(path),
                f"row {row}: duplicate case id {case_id!r} (also on row {first_row[case_id]}); which row is right "
                "is ambiguous, so the case is left out",
                case_id,
            )
            continue
        first_row[case_id] = row
        parts = [(c, _text(texts[c][row])) for c in report_columns]
        parts = [(c, t) for c, t in parts if t]
        if not parts:
            no_report.append(row)
            problem(
                str(path), f"row {row} ({value}): the report is empty in column(s) {report_columns}", case_id
            )
            continue
        if len(report_columns) == 1:
            report = parts[0][1]
        else:
            report = "\n".join(f"{section_name(c)}: {t}" for c, t in parts)
        image = Path(value).expanduser()
        image = image if image.is_absolute() else resolve_image_path(value, root)
        records.append({"case_id": case_id, "image": str(image), "report": report, "row": row})

    if problems is not None:
        _identical_reports(path, records, problems)
        if len(records) > 1 and not any(Path(r["image"]).is_file() for r in records):
            raise DataError(
                f"none of the {len(records)} images is under {root} (first: {records[0]['image']}); set "
                "data.image_root (mosmos check: --image-root) to the folder holding the volumes"
            )
        kept = []
        for r in records:
            if Path(r["image"]).is_file():
                kept.append(r)
            else:
                problem(r["image"], f"image of row {r['row']} of {path.name} not found", r["case_id"])
        return kept
    if duplicates:
        raise DataError(
            f"{path}: duplicate case id(s) {duplicates[:5]}{' ...' if len(duplicates) > 5 else ''}; each row "
            "must name a different volume"
        )
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


def _identical_reports(path: Path, records: list[dict[str, Any]], problems: list[Problem]) -> None:
    """A warning for every report text shared by several rows (fine for reconstructions of one scan,
    as in CT-RATE; otherwise often a copy-paste or join error)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        rows.setdefault(r["report"], []).append(r)
    for group in rows.values():
        if len(group) > 1:
            shown = [g["row"] for g in group[:6]]
            problems.append(
                Problem(
                    str(path),
                    f"rows {shown}{' ...' if len(group) > 6 else ''} ({len(group)} rows) have the identical report "
                    "text: fine for reconstructions of one scan, otherwise a copy-paste error",
                    None,
                    path.name,
                    "warning",
                )
            )
