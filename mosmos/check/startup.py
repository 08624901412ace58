"""What a run does with the problems its inputs have: raise listing them, or skip the bad cases."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from mosmos.check.cases import CaseFiles, CheckCache, check_cases
from mosmos.errors import DataError, Problem

logger = logging.getLogger("mosmos")


def raise_for_problems(
    problems: Sequence[Problem], what: str, max_shown: int = 10, hint: str | None = None
) -> None:
    """Raise one :class:`DataError` listing the errors among ``problems`` (``data.on_bad_case=error``)."""
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return
    by_case = defaultdict(list)
    for p in errors:
        by_case[(p.dataset, p.case)].append(p)
    lines = [f"  {p.path}: {p.message}" for p in errors[:max_shown]]
    more = f"\n  ... and {len(errors) - max_shown} more" if len(errors) > max_shown else ""
    raise DataError(
        f"{what}: {len(errors)} problem(s) in {len(by_case)} case(s):\n"
        + "\n".join(lines)
        + more
        + "\n"
        + (
            hint
            or "Fix them (`mosmos check PATH` lists every problem), or set data.on_bad_case=skip to train "
            "without these cases (they are listed in RUN/skipped.csv)."
        )
    )


def start_up_checks(
    cases: Sequence[CaseFiles],
    listing_problems: Sequence[Problem],
    *,
    mode: str,
    on_bad_case: str,
    what: str,
    cache_path: str | Path | None,
) -> tuple[set[tuple[str | None, str]], list[Problem]]:
    """The checks a training run does on the cases it uses.

    Args:
        cases: the cases the run reads.
        listing_problems: problems found while listing them (rows without images, duplicate ids ...).
        mode: ``data.check``: "full", "header" or "none".
        on_bad_case: "error" raises listing every problem; "skip" returns them.
        what: names the inputs in the error message.
        cache_path: JSON file of per-file results (a second run does not read every volume again).

    Returns:
        ``({(dataset, case) with an error}, every problem)``.
    """
    problems = list(listing_problems)
    if mode != "none":
        problems += check_cases(cases, deep=mode == "full", workers=2, cache=CheckCache(cache_path))
    for p in problems:
        if p.severity != "error":
            logger.warning("%s: %s", p.path, p.message)
    if on_bad_case == "error":
        raise_for_problems(problems, what)
    bad = {(p.dataset, p.case) for p in problems if p.severity == "error" and p.case is not None}
    table_level = [p for p in problems if p.severity == "error" and p.case is None]
    if table_level:  # not tied to one case: skipping cannot help
        raise_for_problems(table_level, what)
    return bad, problems
