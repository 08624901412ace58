"""Statistics of the initialisation benchmark: case means, hierarchical bootstrap intervals, paired tests.

Everything here works on plain rows (dicts), the per-case rows of ``OUTPUT/cases.csv``:
``{"strategy", "budget", "fraction", "seed", "dataset", "case", "organ", "dice", "hd95"}``; a label
budget is ``f<fraction>`` (a share of the target's training cases) or ``n<count>`` (that many
labelled training cases).

The unit of analysis is the test case: its score is the mean Dice over the organs scored on it
(:func:`case_means`). Organs of one case are not independent observations, and neither are the
cases of one seed (they share one trained model), so:

* intervals come from a two-level (hierarchical) bootstrap (:func:`hierarchical_bootstrap`):
  resample the seeds with replacement, then, within each drawn seed, the test cases;
* the paired test compares two strategies on the case means averaged over the seeds both ran
  (one value per test case: n = number of test cases), with the Wilcoxon signed-rank test
  (two-sided, ``scipy.stats.wilcoxon``), and p-values of a family of comparisons are corrected by
  Holm's step-down method (:func:`holm`).

A seed here is a fine-tuning seed; where the benchmark also varies the pretraining seed (its
``pretrain_seeds``), seed i pairs fine-tuning seed i with pretraining seed i, so resampling seeds
resamples both sources of variation together.
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
    "BootstrapCI",
    "Comparison",
    "PairedTest",
    "budget_of",
    "case_matrix",
    "case_means",
    "compare",
    "curve_means",
    "hierarchical_bootstrap",
    "holm",
    "organ_means",
    "paired_wilcoxon",
    "strategy_interval",
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


def budget_of(row: dict[str, Any]) -> str:
    """A row's label budget (``f0.25``, ``n4``); rows of older benchmarks carry only a fraction."""
    budget = row.get("budget")
    return str(budget) if budget not in (None, "") else f"f{float(row['fraction']):g}"


def _key(row: dict[str, Any]) -> tuple[str, str, int]:
    return str(row["strategy"]), budget_of(row), int(row["seed"])


def organ_means(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, float]]:
    """Per cell (strategy, budget, seed), the mean Dice over test cases of each (dataset/)organ
    (for per-organ plots; the statistics use :func:`case_means`)."""
    groups: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for row in rows:
        organ = f"{row['dataset']}/{row['organ']}" if row.get("dataset") else str(row["organ"])
        groups.setdefault(_key(row), {}).setdefault(organ, []).append(float(row["dice"]))
    return {
        cell: {organ: float(np.nanmean(values)) for organ, values in sorted(organs.items())}
        for cell, organs in groups.items()
    }


# ------------------------------------------------------------------------------------------------
# case-level statistics


def case_means(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, int], dict[tuple[str, str], float]]:
    """Per cell (strategy, budget, seed), each test case's mean Dice over the organs scored on it
    (NaN organ values skipped; a case with no finite value is left out)."""
    groups: dict[tuple[str, str, int], dict[tuple[str, str], list[float]]] = {}
    for row in rows:
        case = (str(row.get("dataset", "")), str(row["case"]))
        groups.setdefault(_key(row), {}).setdefault(case, []).append(float(row["dice"]))
    out: dict[tuple[str, str, int], dict[tuple[str, str], float]] = {}
    for cell, cases in groups.items():
        values = {c: float(np.nanmean(v)) for c, v in cases.items() if not np.all(np.isnan(v))}
        out[cell] = dict(sorted(values.items()))
    return out


def curve_means(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, int, int, str], tuple[float, int]]:
    """Learning curves: per cell and curve point (strategy, budget, seed, step, weights), the mean over
    test cases of each case's mean Dice (:func:`case_means`) and the number of cases. A row carries
    ``step`` and ``weights`` (``snapshot``, or ``best_validation`` for the cell's own score)."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((int(row["step"]), str(row["weights"])), []).append(row)
    out: dict[tuple[str, str, int, int, str], tuple[float, int]] = {}
    for (step, weights), group in groups.items():
        for (strategy, budget, seed), cases in case_means(group).items():
            if cases:
                out[(strategy, budget, seed, step, weights)] = (
                    float(np.mean(list(cases.values()))),
                    len(cases),
                )
    return dict(sorted(out.items()))


def case_matrix(
    rows: Iterable[dict[str, Any]], strategy: str, budget: str, baseline: str | None = None
) -> tuple[list[int], list[tuple[str, str]], np.ndarray]:
    """``(seeds, cases, values[seed, case])``: the case means of ``strategy`` at ``budget``, or,
    with a ``baseline``, the paired differences ``strategy - baseline``.

    Only seeds both strategies ran and cases present in every one of those seeds (for both) are
    kept, so the matrix is complete and every row pairs the same cases.
    """
    means = case_means(rows)

    def per_seed(name: str) -> dict[int, dict[tuple[str, str], float]]:
        return {seed: cases for (s, b, seed), cases in means.items() if s == name and b == budget}

    a = per_seed(strategy)
    b = per_seed(baseline) if baseline is not None else None
    seeds = sorted(set(a) & set(b)) if b is not None else sorted(a)
    if not seeds:
        return [], [], np.zeros((0, 0))
    common = set.intersection(*(set(a[s]) for s in seeds))
    if b is not None:
        common &= set.intersection(*(set(b[s]) for s in seeds))
    cases = sorted(common)
    values = np.array(
        [[a[s][c] - (b[s][c] if b is not None else 0.0) for c in cases] for s in seeds], dtype=float
    ).reshape(len(seeds), len(cases))
    return seeds, cases, values


@dataclass
class BootstrapCI:
    """A mean over seeds and cases with its two-level bootstrap interval."""

    estimate: float
    low: float
    high: float
    n_seeds: int
    n_cases: int

    def format(self, digits: int = 3, signed: bool = False) -> str:
        if math.isnan(self.estimate):
            return "-"
        fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
        text = fmt.format(self.estimate)
        if not math.isnan(self.low):
            text += f" [{fmt.format(self.low)}, {fmt.format(self.high)}]"
        return text


def hierarchical_bootstrap(
    values: np.ndarray, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> BootstrapCI:
    """Mean of ``values[seed, case]`` with a percentile interval from a two-level bootstrap.

    Each replicate draws the seeds with replacement, then, independently within each drawn seed,
    the cases with replacement, and takes the mean of the drawn values (Saravanan et al. 2020,
    "Application of the hierarchical bootstrap to multi-level data in neuroscience"). The interval
    is the replicates' ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles. scipy's
    ``bootstrap`` resamples one level only, hence this function.

    Args:
        values: complete ``[n_seeds, n_cases]`` matrix (see :func:`case_matrix`).
        n_boot: bootstrap replicates.
        confidence: coverage of the interval.
        seed: seed of the resampling (fixed: the same table every time).

    Returns:
        The :class:`BootstrapCI` (NaN bounds for an empty matrix; a zero-width interval for one
        seed and one case).
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"values must be [seeds, cases], got shape {values.shape}")
    n_seeds, n_cases = values.shape
    if values.size == 0:
        return BootstrapCI(math.nan, math.nan, math.nan, n_seeds, n_cases)
    if np.isnan(values).any():
        raise ValueError("values must be complete (no NaN): build them with case_matrix")
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot)
    chunk = max(1, 200_000 // max(1, n_seeds * n_cases))  # bounded memory per batch of replicates
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        seed_idx = rng.integers(0, n_seeds, size=(m, n_seeds))
        case_idx = rng.integers(0, n_cases, size=(m, n_seeds, n_cases))
        replicates[start : start + m] = values[seed_idx[:, :, None], case_idx].mean(axis=(1, 2))
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return BootstrapCI(float(values.mean()), float(low), float(high), n_seeds, n_cases)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None entries, tests not run, stay None and do not count).

    Hand-written: scipy has no Holm correction (``false_discovery_control`` controls the FDR, not the
    family-wise error), and statsmodels is not a dependency.
    """
    present = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    m = len(present)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


@dataclass
class Comparison:
    """``strategy - baseline`` at one label budget: the mean case-level difference with its hierarchical
    bootstrap interval, and a Wilcoxon test on the per-case differences averaged over seeds."""

    strategy: str
    baseline: str
    budget: str
    diff: BootstrapCI
    test: PairedTest
    p_adjusted: float | None = None


def compare(
    rows: Sequence[dict[str, Any]], strategy: str, baseline: str, budget: str, n_boot: int = 10_000
) -> Comparison:
    """Paired case-level comparison of two strategies at one label budget (see the module docstring)."""
    _seeds, _cases, diff = case_matrix(rows, strategy, budget, baseline)
    ci = hierarchical_bootstrap(diff, n_boot=n_boot)
    per_case = diff.mean(axis=0) if diff.size else np.zeros(0)
    test = paired_wilcoxon(per_case, np.zeros_like(per_case))
    return Comparison(strategy, baseline, budget, ci, test)


def strategy_interval(
    rows: Sequence[dict[str, Any]], strategy: str, budget: str, n_boot: int = 10_000
) -> BootstrapCI:
    """Mean case-level Dice of one strategy at one budget, with its hierarchical bootstrap interval."""
    return hierarchical_bootstrap(case_matrix(rows, strategy, budget)[2], n_boot=n_boot)
