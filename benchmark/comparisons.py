"""The paired comparisons of a benchmark summary and its tables of intervals: which strategy is
compared with which (random initialisation, the shuffled-report control of its own stage 1, the
same objective without masks or attention maps), the Holm-corrected families and their text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mosmos.benchmark.config import ATTENTION_SUFFIX, budget_label
from mosmos.benchmark.stats import (
    MIN_NONZERO_PAIRS,
    BootstrapCI,
    Comparison,
    compare,
    holm,
    strategy_interval,
)

__all__ = [
    "CONTROLS",
    "TABLE_NOTE",
    "comparison_family",
    "control_of",
    "count_text",
    "family_lines",
    "format_interval_table",
    "init_sections",
    "interval_table",
    "signed_text",
]


def signed_text(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:+.{digits}f}".replace("-0." + "0" * digits, "+0." + "0" * digits)


def count_text(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _comparison_text(c: Comparison) -> str:
    head = f"{budget_label(c.budget)}: {c.strategy} vs {c.baseline}"
    if not c.diff.n_seeds or not c.diff.n_cases:
        return f"{head}: not compared (no finished cells of one of them)"
    text = (
        f"{head}: {c.diff.format(signed=True)} mean Dice difference per test case (95 % CI; "
        f"{count_text(c.diff.n_seeds, 'seed')} x {count_text(c.diff.n_cases, 'test case')}); Wilcoxon signed-rank "
        f"on the {c.test.n} per-case differences averaged over seeds: "
    )
    if c.test.p is None:
        return text + c.test.format_p()
    return text + f"p={c.test.p:.3g}, Holm-adjusted p={c.p_adjusted:.3g}"


#: The shuffled-report controls: stage 1 with every scan paired with another scan's report.
CONTROLS = ("shuffled_tags", "shuffled_variant", "shuffled_variant+masks")
CONTROL_TITLES = {
    "shuffled_tags": "Against the shuffled-report control (shuffled_tags, the paper's objective)",
    "shuffled_variant": "Against the shuffled-report control of the variant (shuffled_variant)",
}


def control_of(strategy: str, strategies: Sequence[str]) -> str | None:
    """The shuffled-report control in ``strategies`` that ``strategy``'s gain must beat: the control
    of its stage 1 objective (``shuffled_variant`` for the variant family, ``shuffled_variant+masks``
    for the variant with masks when present, ``shuffled_tags`` for the rest), with its attention maps
    when ``strategy`` feeds them to the decoder and that control is present too. None for random,
    the controls themselves, or when the benchmark has no such control."""
    attention = strategy.endswith(ATTENTION_SUFFIX)
    base = strategy.removesuffix(ATTENTION_SUFFIX)
    if strategy == "random" or base in CONTROLS:
        return None
    if base.startswith("mosmos_variant"):
        candidates = (["shuffled_variant+masks"] if base.endswith("+masks") else []) + ["shuffled_variant"]
    else:
        candidates = ["shuffled_tags"]
    for control in candidates:
        if attention and control + ATTENTION_SUFFIX in strategies:
            return control + ATTENTION_SUFFIX
        if control in strategies:
            return control
    return None


def init_sections(strategies: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    """The ``(baseline, title, others)`` sections of the initialisation axis: every strategy against
    random initialisation, against the shuffled-report control of its own stage 1 (:func:`control_of`),
    each ``+masks`` strategy against the same objective without masks, each ``+attention`` strategy
    against its encoder without the maps; sections whose baseline is absent are left out."""
    sections = [("random", "Against random initialisation", [s for s in strategies if s != "random"])]
    by_control: dict[str, list[str]] = {}
    for s in strategies:
        control = control_of(s, strategies)
        if control is not None:
            by_control.setdefault(control, []).append(s)
    sections += [
        (control, CONTROL_TITLES.get(control, f"Against the shuffled-report control ({control})"), members)
        for control, members in by_control.items()
    ]
    for base in ("mosmos", "mosmos_variant"):
        masked = [s for s in strategies if s == f"{base}+masks"]
        sections.append((base, f"What the masks add ({base}+masks against {base})", masked))
    for s in strategies:
        if s.endswith(ATTENTION_SUFFIX):
            base = s.removesuffix(ATTENTION_SUFFIX)
            sections.append((base, f"What the attention maps add ({s} against {base})", [s]))
    return [sec for sec in sections if sec[2] and sec[0] in strategies]


def interval_table(
    cases: list[dict[str, Any]], strategies: Sequence[str], budgets: Sequence[str]
) -> dict[tuple[str, str], BootstrapCI]:
    """Per (strategy, budget) with finished cells: the case-level mean Dice and its interval."""
    table = {}
    for s in strategies:
        for b in budgets:
            ci = strategy_interval(cases, s, b)
            if ci.n_seeds and ci.n_cases:
                table[(s, b)] = ci
    return table


def format_interval_table(
    table: dict[tuple[str, str], BootstrapCI],
    strategies: Sequence[str],
    budgets: Sequence[str],
    digits: int = 3,
) -> str:
    """Markdown: a row per strategy, a column per label budget, ``0.512 [0.48, 0.54] (3x12)``; the best
    mean per column bold (ties at the shown precision all bold); ``-`` where no cell finished."""
    best = {}
    for b in budgets:
        means = [round(table[(s, b)].estimate, digits) for s in strategies if (s, b) in table]
        if means:
            best[b] = max(means)

    def cell(s: str, b: str) -> str:
        ci = table.get((s, b))
        if ci is None:
            return "-"
        text = ci.format(digits)
        if round(ci.estimate, digits) == best.get(b):
            text = f"**{text}**"
        return f"{text} ({ci.n_seeds}x{ci.n_cases})"

    header = ["strategy", *(budget_label(b) for b in budgets)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for s in strategies:
        lines.append("| " + " | ".join([s, *(cell(s, b) for b in budgets)]) + " |")
    return "\n".join(lines)


TABLE_NOTE = (
    "The unit is the test case: its Dice is the mean over the organs scored on it. Each entry is the "
    "mean over seeds and test cases, with a 95 % interval from a hierarchical bootstrap (seeds "
    "resampled, then test cases within each seed; 10 000 replicates); the best mean per column in "
    "bold; (seeds x test cases) in brackets."
)


def comparison_family(
    cases: list[dict[str, Any]],
    budgets: Sequence[str],
    sections: Sequence[tuple[str, str, list[str]]],
) -> list[tuple[str, list[Comparison]]]:
    """Every ``(baseline, title, others)`` section's paired comparisons (each of ``others`` against
    ``baseline`` at every budget), their p-values Holm-corrected together as one family."""
    planned = [
        (title, [compare(cases, s, baseline, b) for b in budgets for s in others])
        for baseline, title, others in sections
        if others
    ]
    comparisons = [c for _, group in planned for c in group]
    for c, p in zip(comparisons, holm([c.test.p for c in comparisons]), strict=True):
        c.p_adjusted = p
    return planned


def family_lines(planned: list[tuple[str, list[Comparison]]], heading: str, family: str) -> list[str]:
    lines = []
    for title, group in planned:
        lines += [f"{heading} {title}", ""]
        lines += [f"- {_comparison_text(c)}." for c in group]
        lines.append("")
    comparisons = [c for _, group in planned for c in group]
    if comparisons:
        tested = sum(c.test.p is not None for c in comparisons)
        lines += [
            "Differences pair the same test case under both strategies at the same budget and seed "
            "(`strategy - baseline`); the interval resamples seeds, then cases. The test is a "
            "two-sided Wilcoxon signed-rank test on one value per test case (its difference averaged "
            f"over seeds), n = the number of test cases; with fewer than {MIN_NONZERO_PAIRS} non-zero "
            f"differences no p-value is given. The {tested} p-values of {family} are corrected together "
            "for multiple comparisons by Holm's step-down method.",
            "",
        ]
    return lines
