"""Statistics of the initialisation benchmark: per-cell means, mean ± std tables, paired tests.

Everything here works on plain rows (dicts), the per-case rows of ``OUTPUT/cases.csv``:
``{"strategy", "fraction", "seed", "dataset", "case", "organ", "dice", "hd95"}``.

* A cell's mean Dice is the mean over organs of the organ's mean Dice over test cases (the
  ``mean_dice`` of :func:`mosmos.finetune.metrics.summarize`: each organ counts once).
* The table gives, per strategy and label fraction, the mean and the sample standard deviation
  (``ddof=1``) over seeds of those per-seed means.
* Paired comparisons use the Wilcoxon signed-rank test (two-sided, ``scipy.stats.wilcoxon`` with its
  default zero handling, which drops zero differences) on the Dice of the same (case, organ, seed)
  under two strategies at the same fraction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "MIN_NONZERO_PAIRS",
    "CellStat",
    "PairedTest",
    "cell_means",
    "format_mean_std_table",
    "mean_std_table",
    "organ_means",
    "paired_dice",
    "paired_wilcoxon",
]

#: With fewer non-zero differences than this, the exact two-sided signed-rank p-value cannot go
#: below 0.05 (its minimum is 2 / 2**n: 0.0625 at n = 5, 0.031 at n = 6), so no test is reported.
MIN_NONZERO_PAIRS = 6


@dataclass
class PairedTest:
    """A paired Wilcoxon signed-rank test of ``a - b``.

    Attributes:
        n: pairs with both values present (NaN pairs dropped).
        n_nonzero: pairs whose difference is not zero (the ones the test ranks).
        mean_diff: mean of ``a - b`` over the ``n`` pairs (NaN when ``n == 0``).
        median_diff: median of ``a - b`` over the ``n`` pairs (NaN when ``n == 0``).
        statistic: the test statistic (``scipy``'s), or None when no test was run.
        p: the two-sided p-value, or None when no test was run.
        reason: why no test was run (``p is None``), else an empty string.
    """

    n: int
    n_nonzero: int
    mean_diff: float
    median_diff: float
    statistic: float | None
    p: float | None
    reason: str = ""

    def format_p(self) -> str:
        """``p=0.0123``, or ``p n/a (reason)``."""
        if self.p is None:
            return f"p n/a ({self.reason})"
        return f"p={self.p:.3g}"


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test of paired samples ``a`` and ``b``.

    Pairs where either value is NaN are dropped. No test is run (``p`` None, with a reason) when
    there are no pairs, when every difference is zero, or when fewer than
    :data:`MIN_NONZERO_PAIRS` differences are non-zero.

    Args:
        a: values of the first condition (e.g. Dice of a pretrained strategy).
        b: the paired values of the second condition, same length and order.

    Returns:
        The :class:`PairedTest`.

    Raises:
        ValueError: when ``a`` and ``b`` differ in length.
    """
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1-D and of equal length, got {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    d = x - y
    n, n_nonzero = len(d), int(np.count_nonzero(d))
    mean_diff = float(d.mean()) if n else math.nan
    median_diff = float(np.median(d)) if n else math.nan
    if n == 0:
        return PairedTest(0, 0, mean_diff, median_diff, None, None, "no pairs")
    if n_nonzero == 0:
        return PairedTest(n, 0, mean_diff, median_diff, None, None, f"all {n} differences are zero")
    if n_nonzero < MIN_NONZERO_PAIRS:
        return PairedTest(
            n,
            n_nonzero,
            mean_diff,
            median_diff,
            None,
            None,
            f"only {n_nonzero} non-zero differences; at least {MIN_NONZERO_PAIRS} are needed for p < 0.05",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = wilcoxon(x, y, alternative="two-sided")
    return PairedTest(n, n_nonzero, mean_diff, median_diff, float(res.statistic), float(res.pvalue))


def _key(row: dict[str, Any]) -> tuple[str, float, int]:
    return str(row["strategy"]), float(row["fraction"]), int(row["seed"])


def organ_means(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, float, int], dict[str, float]]:
    """Per cell (strategy, fraction, seed), the mean Dice over test cases of each (dataset/)organ."""
    groups: dict[tuple[str, float, int], dict[str, list[float]]] = {}
    for row in rows:
        organ = f"{row['dataset']}/{row['organ']}" if row.get("dataset") else str(row["organ"])
        groups.setdefault(_key(row), {}).setdefault(organ, []).append(float(row["dice"]))
    return {
        cell: {organ: float(np.mean(values)) for organ, values in sorted(organs.items())}
        for cell, organs in groups.items()
    }


def cell_means(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, float, int], float]:
    """Per cell (strategy, fraction, seed), the mean over organs of the organ's mean Dice over cases."""
    return {cell: float(np.mean(list(organs.values()))) for cell, organs in organ_means(rows).items()}


@dataclass
class CellStat:
    """Mean and sample std (``ddof=1``; NaN for one seed) over seeds of the per-seed mean Dice."""

    mean: float
    std: float
    n_seeds: int


def mean_std_table(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, float], CellStat]:
    """Per (strategy, fraction), mean ± std over seeds of the per-seed mean Dice (see :func:`cell_means`)."""
    per_seed: dict[tuple[str, float], list[float]] = {}
    for (strategy, fraction, _seed), value in sorted(cell_means(rows).items()):
        per_seed.setdefault((strategy, fraction), []).append(value)
    out = {}
    for key, values in per_seed.items():
        arr = np.asarray(values)
        std = float(arr.std(ddof=1)) if len(arr) > 1 else math.nan
        out[key] = CellStat(float(arr.mean()), std, len(arr))
    return out


def format_mean_std_table(
    table: dict[tuple[str, float], CellStat],
    strategies: Sequence[str],
    fractions: Sequence[float],
    digits: int = 3,
) -> str:
    """Markdown table: one row per strategy, one column per label fraction, best mean per column bold.

    A cell reads ``0.512 ± 0.034 (3)`` (mean ± std over seeds, seed count); with one seed the std is
    left out; a cell with no finished run reads ``-``. Ties at the shown precision are all bold.
    """
    best: dict[float, float] = {}
    for fraction in fractions:
        means = [round(table[(s, fraction)].mean, digits) for s in strategies if (s, fraction) in table]
        means = [m for m in means if not math.isnan(m)]
        if means:
            best[fraction] = max(means)

    def cell(strategy: str, fraction: float) -> str:
        stat = table.get((strategy, fraction))
        if stat is None or math.isnan(stat.mean):
            return "-"
        text = f"{stat.mean:.{digits}f}"
        if not math.isnan(stat.std):
            text += f" ± {stat.std:.{digits}f}"
        if round(stat.mean, digits) == best.get(fraction):
            text = f"**{text}**"
        return f"{text} ({stat.n_seeds})"

    header = ["strategy", *(f"fraction {f:g}" for f in fractions)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for strategy in strategies:
        lines.append("| " + " | ".join([strategy, *(cell(strategy, f) for f in fractions)]) + " |")
    return "\n".join(lines)


def paired_dice(
    rows: Iterable[dict[str, Any]], strategy: str, baseline: str, fraction: float
) -> tuple[list[float], list[float]]:
    """Dice of ``strategy`` and ``baseline`` on the (dataset, case, organ, seed) both have at ``fraction``."""
    values: dict[str, dict[tuple, float]] = {strategy: {}, baseline: {}}
    for row in rows:
        if row["strategy"] in values and math.isclose(float(row["fraction"]), fraction):
            key = (row.get("dataset", ""), str(row["case"]), str(row["organ"]), int(row["seed"]))
            values[row["strategy"]][key] = float(row["dice"])
    common = sorted(set(values[strategy]) & set(values[baseline]))
    return [values[strategy][k] for k in common], [values[baseline][k] for k in common]
