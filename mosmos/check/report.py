"""The report ``mosmos check`` gives for one table or dataset, and problems written as CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mosmos.errors import Problem
from mosmos.io import atomic_write_text


@dataclass
class CheckReport:
    """The problems found in one table or dataset."""

    target: str  # what was checked
    kind: str  # "report table" | "segmentation dataset"
    cases: int = 0  # cases (rows / image-label pairs) checked
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity != "error"]

    def bad_cases(self) -> set[tuple[str | None, str]]:
        """(dataset, case) of every case with an error."""
        return {(p.dataset, p.case) for p in self.errors if p.case is not None}

    def format(self, max_problems: int | None = None) -> str:
        n_err, n_warn = len(self.errors), len(self.warnings)
        head = (
            f"{self.kind} {self.target}: {self.cases} case(s) checked, {n_err} error(s), {n_warn} warning(s)"
        )
        if n_err:
            head += f" in {len(self.bad_cases())} case(s)" if self.bad_cases() else ""
        lines = [head]
        shown = self.errors + self.warnings
        for p in shown[:max_problems] if max_problems else shown:
            tag = "ERROR  " if p.severity == "error" else "warning"
            lines.append(f"  {tag} {p.path}: {p.message}")
        if max_problems and len(shown) > max_problems:
            lines.append(f"  ... and {len(shown) - max_problems} more")
        return "\n".join(lines)


PROBLEM_COLUMNS = ("severity", "dataset", "case", "path", "message")


def problems_csv(problems: Iterable[Problem], extra: dict[str, str] | None = None) -> str:
    """Problems as CSV text (``extra`` columns are prepended with constant values)."""
    buf = io.StringIO()
    extra = extra or {}
    writer = csv.writer(buf)
    writer.writerow([*extra, *PROBLEM_COLUMNS])
    for p in problems:
        writer.writerow([*extra.values(), *(getattr(p, c) or "" for c in PROBLEM_COLUMNS)])
    return buf.getvalue()


def write_problems_csv(path: str | Path, problems: Iterable[Problem]) -> None:
    """Write ``problems`` to ``path`` as CSV (a run's ``skipped.csv``), atomically."""
    atomic_write_text(path, problems_csv(problems))


def strip_path(message: str, path: str | Path) -> str:
    """``message`` without a leading "PATH: " (the problem names the path already)."""
    for prefix in (str(path), str(Path(path).expanduser().resolve())):
        if message.startswith(prefix + ": "):
            return message[len(prefix) + 2 :]
    return message
