"""The benchmark report: ``results.csv``, ``cases.csv``, ``curves.csv``, ``summary.md`` and plots per axis.

Written from the finished cells (those with ``DONE.json``) of the current grid, at the end of every
``mosmos benchmark`` call, so an interrupted benchmark still reports what it has. The summary is
generated from the numbers only: case-level means and differences with hierarchical bootstrap
intervals, paired tests on case means with Holm's correction, each with what was compared and n.
The partial-label axis (``partial:<name>`` strategies, ``axis=partial_label`` in the CSVs) gets the
same table, comparisons (against its first strategy, a Holm family of their own) and plots.
Learning curves (``curve_points``): every cell's test scores of its snapshots, with its own score as
the last point, in ``curves.csv`` and ``dice_vs_steps.png``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mosmos.benchmark.comparisons import interval_table
from mosmos.benchmark.config import PARTIAL_PREFIX, BenchmarkConfig, budget_label
from mosmos.benchmark.plan import CURVE_TEST_PREFIX, DONE_FILE, Plan, axis_of
from mosmos.benchmark.plots import plot_dice_vs_budget, plot_dice_vs_steps, plot_organ_dice
from mosmos.benchmark.stats import (
    budget_of,
    curve_means,
)
from mosmos.benchmark.summary import write_summary
from mosmos.errors import DataError
from mosmos.io import atomic_path, atomic_write_text

__all__ = [
    "CASE_COLUMNS",
    "CURVE_COLUMNS",
    "RESULT_COLUMNS",
    "collect",
    "collect_curves",
    "curve_rows",
    "organ_rows",
    "write_report",
]

CASE_COLUMNS = ("axis", "strategy", "budget", "fraction", "seed", "dataset", "case", "organ", "dice", "hd95")
#: One row per cell x learning-curve point: ``weights`` is ``snapshot`` (the weights after ``step``
#: optimizer steps, ``step_fraction`` of the cell's step cap) or ``best_validation`` (the cell's own
#: score, ``step_fraction`` 1, ``step`` the steps it trained); ``dice``: mean over test cases of each
#: case's mean Dice over the organs scored.
CURVE_COLUMNS = ("axis", "strategy", "budget", "seed", "step", "step_fraction", "weights", "n_cases", "dice")
RESULT_COLUMNS = (
    "axis",
    "strategy",
    "budget",
    "fraction",
    "seed",
    "dataset",
    "organ",
    "dice",
    "hd95",
    "n_cases",
    "hd95_missing",
    "train_seconds",
    "steps",
    "best_epoch",
)


def collect(plan: Plan) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-case test rows and ``DONE.json`` records of the plan's finished cells."""
    from mosmos.finetune.metrics import read_case_csv

    cases, records = [], []
    for cell in plan.cells:
        if not cell.done:
            continue
        done_path, csv_path = cell.dir / DONE_FILE, cell.dir / "test" / "cases.csv"
        try:
            record = json.loads(done_path.read_text(encoding="utf-8"))
            rows = read_case_csv(csv_path)
        except (OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
            raise DataError(f"{cell.dir}: a finished cell whose results cannot be read: {exc}") from None
        ident = {
            "axis": axis_of(cell.strategy),
            "strategy": cell.strategy,
            "budget": cell.budget,
            "fraction": cell.fraction,
            "seed": cell.seed,
        }
        records.append({**record, **ident})
        # a partial-label model segments the other datasets' organs too: only the target's are scored
        scored = record.get("target_organs")
        cases += [
            {**ident, **{k: r[k] for k in ("dataset", "case", "organ", "dice", "hd95")}}
            for r in rows
            if scored is None or r["organ"] in scored
        ]
    return cases, records


def collect_curves(
    plan: Plan, cases: list[dict[str, Any]], records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per-case test rows of the learning-curve points of the finished cells that have any: each
    scored snapshot (``test_step_<k>/cases.csv``, ``weights=snapshot``), then the cell's own score
    (its rows of ``cases``, ``weights=best_validation``, ``step_fraction`` 1)."""
    from mosmos.finetune.metrics import read_case_csv

    by_cell = {(r["strategy"], budget_of(r), int(r["seed"])): r for r in records}
    final: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in cases:
        final.setdefault((row["strategy"], budget_of(row), int(row["seed"])), []).append(row)
    out: list[dict[str, Any]] = []
    for cell in plan.cells:
        record = by_cell.get((cell.strategy, cell.budget, cell.seed))
        if not cell.done or record is None or not record.get("curve"):
            continue
        ident = {"axis": axis_of(cell.strategy), "strategy": cell.strategy, "budget": cell.budget}
        ident |= {"fraction": cell.fraction, "seed": cell.seed}
        scored = record.get("target_organs")
        for point in record["curve"]:
            path = cell.dir / f"{CURVE_TEST_PREFIX}{point['step']}" / "cases.csv"
            try:
                rows = read_case_csv(path)
            except (OSError, KeyError, ValueError) as exc:
                raise DataError(f"{path}: a scored learning-curve point that cannot be read: {exc}") from None
            where = {
                "step": int(point["step"]),
                "step_fraction": float(point["fraction"]),
                "weights": "snapshot",
            }
            out += [
                {**ident, **where, **{k: r[k] for k in ("dataset", "case", "organ", "dice")}}
                for r in rows
                if scored is None or r["organ"] in scored
            ]
        where = {"step": int(record.get("steps") or 0), "step_fraction": 1.0, "weights": "best_validation"}
        out += [{**r, **where} for r in final.get((cell.strategy, cell.budget, cell.seed), [])]
    return out


def curve_rows(curve_cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``curves.csv``: one row per cell x curve point (:data:`CURVE_COLUMNS`)."""
    shares = {
        (r["strategy"], budget_of(r), int(r["seed"]), int(r["step"]), r["weights"]): r for r in curve_cases
    }
    out = []
    for key, (dice, n) in curve_means(curve_cases).items():
        strategy, budget, seed, step, weights = key
        out.append(
            {
                "axis": axis_of(strategy),
                "strategy": strategy,
                "budget": budget,
                "seed": seed,
                "step": step,
                "step_fraction": shares[key]["step_fraction"],
                "weights": weights,
                "n_cases": n,
                "dice": dice,
            }
        )
    order = {"snapshot": 0, "best_validation": 1}
    return sorted(
        out, key=lambda r: (r["axis"], r["strategy"], r["budget"], r["seed"], order[r["weights"]], r["step"])
    )


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def organ_rows(cases: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell × (dataset, organ): mean Dice and NaN-mean HD95 over test cases, cell timing."""
    by_cell = {(r["strategy"], budget_of(r), r["seed"]): r for r in records}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in cases:
        key = (row["strategy"], budget_of(row), row["seed"], row["dataset"], row["organ"])
        groups.setdefault(key, []).append(row)
    out = []
    for (strategy, budget, seed, dataset, organ), rows in groups.items():
        record = by_cell.get((strategy, budget, seed), {})
        hd = [float(r["hd95"]) for r in rows]
        out.append(
            {
                "axis": axis_of(strategy),
                "strategy": strategy,
                "budget": budget,
                "fraction": rows[0]["fraction"],
                "seed": seed,
                "dataset": dataset,
                "organ": organ,
                "dice": float(np.mean([float(r["dice"]) for r in rows])),
                "hd95": _nanmean(hd),
                "n_cases": len(rows),
                "hd95_missing": sum(math.isnan(h) for h in hd),
                "train_seconds": record.get("train_seconds"),
                "steps": record.get("steps"),
                "best_epoch": record.get("best_epoch"),
            }
        )
    return out


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row[c]) for c in columns])


def write_report(cfg: BenchmarkConfig, plan: Plan) -> Path:
    """Write every report file into ``cfg.output_dir`` from the finished cells; returns ``summary.md``."""
    out = Path(cfg.output_dir)
    cases, records = collect(plan)
    _write_csv(out / "cases.csv", cases, CASE_COLUMNS)
    _write_csv(out / "results.csv", organ_rows(cases, records), RESULT_COLUMNS)
    curve_cases = collect_curves(plan, cases, records)
    if curve_cases:
        _write_csv(out / "curves.csv", curve_rows(curve_cases), CURVE_COLUMNS)
    plots: list[tuple[str, str]] = []
    partial = [f"{PARTIAL_PREFIX}{n}" for n in cfg.partial_strategies]
    axes = (  # axis, its strategies, file prefix, title prefix, what a line or bar is
        ("initialisation", list(cfg.strategies), "", "", "strategy"),
        ("partial_label", partial, "partial_", "Partial-label strategies: ", "partial-label strategy"),
    )
    for axis, strategies, prefix, title, noun in axes:
        rows = [r for r in cases if r["axis"] == axis]
        if not rows:
            continue
        budgets = cfg.budgets
        table = interval_table(rows, strategies, budgets)
        axis_records = [r for r in records if r["axis"] == axis]
        name = f"{prefix}dice_vs_budget.png"
        plot_dice_vs_budget(
            table, axis_records, strategies, budgets, out / name, f"{title}Dice vs label budget"
        )
        plots.append(
            (
                name,
                f"mean test Dice per case of each {noun} against the number of labelled training cases of "
                "the target (95 % CIs).",
            )
        )
        axis_curves = [r for r in curve_cases if r["axis"] == axis]
        if axis_curves:
            name = f"{prefix}dice_vs_steps.png"
            plot_dice_vs_steps(
                axis_curves, strategies, budgets, out / name, f"{title}Dice vs optimizer steps"
            )
            plots.append(
                (
                    name,
                    f"learning curves: mean test Dice per case of each {noun} against optimizer steps, one "
                    "panel per label budget (95 % CIs; the last point is the cells' best-validation weights).",
                )
            )
        done = {budget_of(r) for r in rows}
        lowest = next(b for b in budgets if b in done)
        name = f"{prefix}organ_dice_{lowest}.png"
        organ_title = f"{title}per-organ Dice" if title else "Per-organ Dice"
        plot_organ_dice(rows, strategies, lowest, out / name, organ_title)
        plots.append(
            (
                name,
                f"per-organ test Dice per {noun} at the smallest finished budget ({budget_label(lowest)}).",
            )
        )
    summary = out / "summary.md"
    atomic_write_text(summary, write_summary(cfg, plan, cases, records, plots, bool(curve_cases)))
    return summary
