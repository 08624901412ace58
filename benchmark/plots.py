"""The benchmark's plots: Dice against label budget (log x, strategies dodged), learning curves
(Dice against steps with bootstrap bands) and per-organ Dice, each written atomically as PNG.

matplotlib's object API without pyplot (no display, no global state), as every mosmos figure.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mosmos.benchmark.config import budget_label
from mosmos.benchmark.stats import BootstrapCI, budget_of, organ_means, strategy_interval
from mosmos.io import atomic_path

__all__ = [
    "curve_intervals",
    "dodged_positions",
    "plot_dice_vs_budget",
    "plot_dice_vs_steps",
    "plot_organ_dice",
]


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def dodged_positions(
    x_of: dict[str, float], strategies: Sequence[str], max_factor: float = 1.06
) -> dict[tuple[str, str], float]:
    """Where each strategy's point of each budget goes on a log x axis: the strategies spread
    symmetrically around the budget's position, a constant factor apart (at most ``max_factor``,
    less where budgets sit close: one group never spans more than 40 % of the log distance to the
    next budget), so their interval bars do not overlap and no group runs into its neighbour.

    Returns:
        ``{(strategy, budget): x}`` for every strategy and budget of ``x_of``.
    """
    logs = sorted({math.log(x) for x in x_of.values()})
    gap = min((b - a for a, b in itertools.pairwise(logs)), default=math.inf)
    n = len(strategies)
    step = min(math.log(max_factor), 0.4 * gap / (n - 1)) if n > 1 else 0.0
    return {
        (s, b): x * math.exp(step * (i - (n - 1) / 2))
        for i, s in enumerate(strategies)
        for b, x in x_of.items()
    }


def plot_dice_vs_budget(
    table: dict[tuple[str, str], BootstrapCI],
    records: list[dict[str, Any]],
    strategies: Sequence[str],
    budgets: Sequence[str],
    path: Path,
    title: str = "Dice vs label budget",
) -> None:
    """Mean test Dice against the number of labelled training cases (log x), one line per strategy,
    95 % hierarchical bootstrap intervals; strategies dodged sideways so the bars do not overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts: dict[str, list[int]] = {}
    for r in records:
        if r.get("n_train_cases") is not None:
            counts.setdefault(budget_of(r), []).append(int(r["n_train_cases"]))
    x_of = {b: float(np.mean(counts[b])) if b in counts else float(i + 1) for i, b in enumerate(budgets)}
    fig = Figure(figsize=(6.5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = [s for s in strategies if any((s, b) in table for b in budgets)]
    positions = dodged_positions(x_of, shown)
    for s in shown:
        bs = [b for b in budgets if (s, b) in table]
        xs = [positions[(s, b)] for b in bs]
        means = np.array([table[(s, b)].estimate for b in bs])
        low = means - np.array([table[(s, b)].low for b in bs])
        high = np.array([table[(s, b)].high for b in bs]) - means
        ax.errorbar(xs, means, yerr=[low, high], marker="o", capsize=3, label=s)
    ax.set_xscale("log")
    ax.set_xlim(min(x_of.values()) / 1.6, max(x_of.values()) * 1.6)
    ax.set_xticks([x_of[b] for b in budgets])
    ax.set_xticklabels([f"{x_of[b]:g}" if b in counts else budget_label(b) for b in budgets], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("labelled training cases of the target")
    ax.set_ylabel("mean test Dice per case (95 % CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def curve_intervals(
    curve_cases: list[dict[str, Any]], strategy: str, budget: str
) -> list[tuple[float, BootstrapCI, str]]:
    """The learning curve of one strategy at one budget: ``(x, interval, weights)`` per point, in step
    order: each snapshot step with the case-level mean Dice over seeds and its hierarchical bootstrap
    interval, then the cells' own scores (best-validation weights) at the mean number of steps trained."""
    rows = [r for r in curve_cases if r["strategy"] == strategy and budget_of(r) == budget]
    points = []
    for step in sorted({int(r["step"]) for r in rows if r["weights"] == "snapshot"}):
        at = [r for r in rows if r["weights"] == "snapshot" and int(r["step"]) == step]
        points.append((float(step), strategy_interval(at, strategy, budget), "snapshot"))
    final = [r for r in rows if r["weights"] == "best_validation"]
    if final:
        trained = {int(r["seed"]): int(r["step"]) for r in final}
        x = float(np.mean(list(trained.values())))
        points.append((x, strategy_interval(final, strategy, budget), "best_validation"))
    return [p for p in points if p[1].n_seeds and p[1].n_cases]


def plot_dice_vs_steps(
    curve_cases: list[dict[str, Any]],
    strategies: Sequence[str],
    budgets: Sequence[str],
    path: Path,
    title: str = "Dice vs optimizer steps",
) -> None:
    """Learning curves: mean test Dice per case against optimizer steps, one panel per label budget,
    one line per strategy with its 95 % hierarchical bootstrap band; the last point of a line (open
    marker) is the cells' own score, with their best-validation weights."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown_budgets = [b for b in budgets if any(budget_of(r) == b for r in curve_cases)]
    fig = Figure(figsize=(4.2 * max(1, len(shown_budgets)) + 1, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(shown_budgets)), sharey=True, squeeze=False)[0]
    for ax, budget in zip(axes, shown_budgets, strict=False):
        for i, s in enumerate(strategies):
            points = curve_intervals(curve_cases, s, budget)
            if not points:
                continue
            color = f"C{i % 10}"
            xs = np.array([p[0] for p in points])
            means = np.array([p[1].estimate for p in points])
            ax.plot(xs, means, marker="o", color=color, label=s)
            ax.fill_between(
                xs, [p[1].low for p in points], [p[1].high for p in points], color=color, alpha=0.2
            )
            last = points[-1]
            if last[2] == "best_validation":
                ax.plot([last[0]], [last[1].estimate], marker="o", markersize=9, mfc="white", color=color)
        ax.set_title(budget_label(budget), fontsize=9)
        ax.set_xlabel("optimizer steps")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean test Dice per case (95 % CI)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} (open marker: best-validation weights)", fontsize=10)
    _save(fig, path)


def plot_organ_dice(
    cases: list[dict], strategies: Sequence[str], budget: str, path: Path, title: str = "Per-organ Dice"
) -> None:
    """Grouped bars: per organ, each strategy's mean Dice over seeds at ``budget`` (± std over seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_cell = organ_means([r for r in cases if budget_of(r) == budget])
    organs = sorted({o for values in per_cell.values() for o in values})
    fig = Figure(figsize=(max(6, 1.2 * len(organs) + 2), 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = [s for s in strategies if any(k[0] == s for k in per_cell)]
    width = 0.8 / max(1, len(shown))
    for i, s in enumerate(shown):
        means, stds = [], []
        for organ in organs:
            values = [v[organ] for k, v in per_cell.items() if k[0] == s and organ in v]
            means.append(float(np.mean(values)) if values else math.nan)
            stds.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
        xs = np.arange(len(organs)) + (i - (len(shown) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=s)
    ax.set_xticks(np.arange(len(organs)))
    ax.set_xticklabels([o.split("/")[-1] for o in organs], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean test Dice (± std over seeds)")
    ax.set_title(f"{title} at {budget_label(budget)}")
    ax.legend(fontsize=8)
    _save(fig, path)
