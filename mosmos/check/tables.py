"""Checks of an image–report table: its rows, and every image it names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mosmos.check.cases import CaseFiles, CheckCache, check_cases
from mosmos.check.report import CheckReport, strip_path
from mosmos.errors import MosmosError, Problem

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def is_report_table(path: str | Path) -> bool:
    """A table file (rather than a dataset folder or a datalist / dataset.json)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() not in TABLE_SUFFIXES:
        return False
    if path.suffix.lower() != ".json":
        return True
    try:
        with path.open("rb") as f:
            head = f.read(4096).lstrip()
    except OSError:
        return False
    return head.startswith(b"[")  # a list of records; a datalist / dataset.json is an object


def check_report_table(
    path: str | Path,
    image_column: str = "VolumeName",
    report_columns: Sequence[str] = ("Findings_EN", "Impressions_EN"),
    image_root: str | Path | None = None,
    *,
    deep: bool = True,
    workers: int = 1,
    cache: CheckCache | None = None,
    progress: bool = False,
) -> tuple[CheckReport, list[dict[str, Any]]]:
    """Every problem of an image–report table and its images.

    Returns:
        The report, and the usable records (as :func:`mosmos.table.read_report_table` gives them)
        with every case that has an error left out.
    """
    # deferred: mosmos.table loads Hugging Face `datasets` (a second), which the `mosmos` command line
    # would otherwise pay for on every verb, since it builds the `check` parser up front
    from mosmos.table import read_report_table

    report = CheckReport(str(path), "report table")
    try:
        records = read_report_table(path, image_column, report_columns, image_root, problems=report.problems)
    except MosmosError as e:  # the table as a whole is unusable: nothing more to check
        report.problems.append(Problem(str(path), strip_path(str(e), path)))
        return report, []
    report.cases = len(records) + len({p.case for p in report.problems if p.case is not None})
    present = [r for r in records if (r["case_id"]) not in {p.case for p in report.errors}]
    report.problems += check_cases(
        [CaseFiles(r["case_id"], r["image"], dataset=Path(path).name) for r in present],
        deep=deep,
        workers=workers,
        cache=cache,
        progress=progress,
    )
    bad = {p.case for p in report.errors if p.case is not None}
    return report, [r for r in records if r["case_id"] not in bad]
