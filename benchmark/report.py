"""The benchmark report: ``results.csv``, ``cases.csv``, ``summary.md`` and two plots.

Written from the finished cells (those with ``DONE.json``) of the current grid, at the end of every
``mosmos benchmark`` call, so an interrupted benchmark still reports what it has. The summary is
generated from the numbers only: means, standard deviations, differences and p-values, each with
what was compared and on how many pairs.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mosmos.benchmark.config import BenchmarkConfig
from mosmos.benchmark.plan import DONE_FILE, Plan
from mosmos.benchmark.stats import (
    MIN_NONZERO_PAIRS,
    format_mean_std_table,
    mean_std_table,
    organ_means,
    paired_dice,
    paired_wilcoxon,
)
from mosmos.errors import DataError
from mosmos.io import atomic_path, atomic_write_text

__all__ = ["CASE_COLUMNS", "RESULT_COLUMNS", "collect", "organ_rows", "write_report"]

CASE_COLUMNS = ("strategy", "fraction", "seed", "dataset", "case", "organ", "dice", "hd95")
RESULT_COLUMNS = (
    "strategy",
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
DESCRIPTIONS = {
    "random": "no pretraining (random initialisation)",
    "mosmos": "stage 1 as configured (contrastive + organ tags)",
    "contrastive_only": "stage 1 with the tag terms off (contrastive only)",
    "tags_only": "stage 1 with the contrastive and embedding-tag terms off (tags only)",
    "mosmos+attention": "the mosmos encoder, plus its pixel-tag attention maps fed to the decoder",
    "multidataset": "supervised stage 2 pretraining on data.other_datasets, its encoder transferred",
    "shuffled_tags": "stage 1 as configured, every scan paired with another scan's report (same compute, "
    "no true pairing)",
}


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
        records.append({**record, "strategy": cell.strategy, "fraction": cell.fraction, "seed": cell.seed})
        ident = {"strategy": cell.strategy, "fraction": cell.fraction, "seed": cell.seed}
        cases += [{**ident, **{k: r[k] for k in ("dataset", "case", "organ", "dice", "hd95")}} for r in rows]
    return cases, records


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def organ_rows(cases: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell × (dataset, organ): mean Dice and NaN-mean HD95 over test cases, cell timing."""
    by_cell = {(r["strategy"], r["fraction"], r["seed"]): r for r in records}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in cases:
        key = (row["strategy"], row["fraction"], row["seed"], row["dataset"], row["organ"])
        groups.setdefault(key, []).append(row)
    out = []
    for (strategy, fraction, seed, dataset, organ), rows in groups.items():
        record = by_cell.get((strategy, fraction, seed), {})
        hd = [float(r["hd95"]) for r in rows]
        out.append(
            {
                "strategy": strategy,
                "fraction": fraction,
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


def _signed(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:+.{digits}f}".replace("-0." + "0" * digits, "+0." + "0" * digits)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _comparison(
    cases: list[dict[str, Any]], table: dict, strategy: str, baseline: str, fraction: float
) -> str:
    a_stat, b_stat = table.get((strategy, fraction)), table.get((baseline, fraction))
    head = f"at fraction {fraction:g}, {strategy} vs {baseline}"
    if a_stat is None or b_stat is None:
        return f"{head}: not compared (no finished cells for one of them)"
    a, b = paired_dice(cases, strategy, baseline, fraction)
    test = paired_wilcoxon(a, b)
    text = (
        f"{head}: {_signed(a_stat.mean - b_stat.mean)} mean Dice ({a_stat.mean:.3f} vs {b_stat.mean:.3f}, "
        f"{a_stat.n_seeds} vs {_count(b_stat.n_seeds, 'seed')}); Wilcoxon signed-rank test (two-sided) "
        f"on n={test.n} paired (case, organ, seed) Dice"
    )
    if test.n:
        text += f": median difference {_signed(test.median_diff)}, {test.format_p()}"
    else:
        text += f": {test.format_p()}"
    return text


def _budget_lines(cfg: BenchmarkConfig, plan: Plan, records: list[dict[str, Any]]) -> list[str]:
    ft = plan.cells[0].config
    steps = sorted({int(r["steps"]) for r in records if r.get("steps") is not None})
    step_text = (
        "not known yet"
        if not steps
        else (
            str(steps[0]) if len(steps) == 1 else f"{steps[0]} to {steps[-1]} (depends on the training cases)"
        )
    )
    budget = (
        f"train.max_steps={ft.train.max_steps}"
        if ft.train.max_steps
        else f"train.epochs={ft.train.epochs}, data.samples_per_epoch={ft.data.samples_per_epoch}"
    )
    lines = [
        f"- Every cell trains the same fixed budget ({budget}, train.batch_size={ft.train.batch_size}, "
        f"model {ft.model.name}); optimizer steps per cell: {step_text}. There is no early stopping: "
        f"each cell is validated every {ft.train.eval_every} epoch(s) and at its end on held-out target "
        f"cases (data.val_fraction={ft.data.val_fraction}) and scored on the test set with the weights "
        "of its best validation evaluation.",
    ]
    best_epochs = [r["best_epoch"] for r in records if r.get("best_epoch") is not None]
    if best_epochs:
        lines.append(
            f"- Best validation epoch per cell: median {float(np.median(best_epochs)):g}, "
            f"range {min(best_epochs)} to {max(best_epochs)}."
        )
    for name, variant in plan.variants.items():
        vt = variant.config.train
        size = f"train.max_steps={vt.max_steps}" if vt.max_steps else f"train.epochs={vt.epochs}"
        kind = "stage 2 supervised" if name == "multidataset" else "stage 1"
        lines.append(
            f"- Pretraining variant {name}: {kind}, {size}, seed {variant.config.seed}, run once in "
            f"{variant.dir} and shared by its cells."
        )
    per_strategy: dict[str, list[float]] = {}
    for r in records:
        if r.get("train_seconds") is not None:
            per_strategy.setdefault(r["strategy"], []).append(float(r["train_seconds"]))
    if per_strategy:
        parts = [f"{s} {np.mean(v):.0f} s" for s, v in per_strategy.items()]
        lines.append(
            f"- Mean fine-tuning time per cell (this machine; pretraining not included): {', '.join(parts)}."
        )
    return lines


def write_summary(
    cfg: BenchmarkConfig,
    plan: Plan,
    cases: list[dict[str, Any]],
    records: list[dict[str, Any]],
    plots: list[tuple[str, str]],
) -> str:
    """The text of ``summary.md``."""
    strategies, fractions = list(cfg.strategies), sorted(cfg.fractions)
    table = mean_std_table(cases)
    test_cases = sorted({(r["dataset"], r["case"]) for r in cases})
    grid = f"{len(strategies)} strateg{'y' if len(strategies) == 1 else 'ies'}"
    organs = sorted({r["organ"] for r in cases})
    lines = [
        "# Initialisation benchmark",
        "",
        f"Fine-tuning target `{cfg.data.target}`; test set `{cfg.data.test}` "
        f"({_count(len(test_cases), 'case')}; "
        f"organs scored, those both the target and the test set label: {', '.join(organs) or 'none yet'}). "
        f"{len(records)} of {len(plan.cells)} cells finished ({grid} x "
        f"{_count(len(fractions), 'label fraction')} x {_count(len(cfg.seeds), 'seed')} {list(cfg.seeds)}).",
        "",
        "## Budget",
        "",
        *_budget_lines(cfg, plan, records),
        "",
        "## Mean test Dice",
        "",
        "Mean ± standard deviation over seeds (ddof=1) of each seed's mean Dice (mean over organs of "
        "the organ's mean over test cases); the number of seeds in brackets; the best mean per column "
        "in bold.",
        "",
        format_mean_std_table(table, strategies, fractions),
        "",
    ]
    comparisons: list[str] = []
    sections = (
        ("random", "Against random initialisation", ("random",)),
        ("shuffled_tags", "Against the shuffled-report control (shuffled_tags)", ("random", "shuffled_tags")),
    )
    for baseline, title, excluded in sections:
        others = [s for s in strategies if s not in excluded]
        if baseline not in strategies or not others:
            continue
        lines += [f"## {title}", ""]
        for fraction in fractions:
            for s in others:
                comparisons.append(_comparison(cases, table, s, baseline, fraction))
                lines.append(f"- {comparisons[-1]}.")
        lines.append("")
    if comparisons:
        lines += [
            f"Pairs are the Dice of the same test case, organ and seed under both strategies at the same "
            f"fraction (NaN pairs dropped); zero differences are dropped by the test (scipy's default), "
            f"and with fewer than {MIN_NONZERO_PAIRS} non-zero differences no p-value is given. The "
            f"{len(comparisons)} p-values are not corrected for multiple comparisons, and pairs from "
            "the same seed share one trained model, so they are not independent.",
            "",
        ]
    lines += ["## Strategies", ""]
    for s in strategies:
        desc = DESCRIPTIONS.get(s, "a user-supplied encoder (model.init=" + s.split(":", 1)[-1] + ")")
        lines.append(f"- `{s}`: {desc}.")
    lines += [
        "",
        "## Files",
        "",
        "- `results.csv`: one row per cell x organ (mean over test cases), with training time.",
        "- `cases.csv`: one row per cell x test case x organ (the paired tests' input).",
        *(f"- `{name}`: {desc}" for name, desc in plots),
        "- `config.yaml`, `versions.json`: the resolved benchmark config and library versions.",
        "- `runs/<strategy>/f<fraction>_s<seed>/`: each cell's run (`test/` holds its test scores).",
        "- `pretrain/<variant>-<config hash>/`: the pretraining runs.",
        "",
    ]
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def plot_dice_vs_fraction(
    table: dict, strategies: Sequence[str], fractions: Sequence[float], path: Path
) -> None:
    """Mean test Dice against label fraction, one line per strategy, error bars ± std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s in strategies:
        xs = [f for f in fractions if (s, f) in table]
        if not xs:
            continue
        means = [table[(s, f)].mean for f in xs]
        stds = [0.0 if math.isnan(table[(s, f)].std) else table[(s, f)].std for f in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=s)
    ax.set_xlabel("label fraction of the target's training cases")
    ax.set_ylabel("mean test Dice (± std over seeds)")
    ax.set_xticks(list(fractions))
    ax.set_title("Dice vs label fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_organ_dice(cases: list[dict], strategies: Sequence[str], fraction: float, path: Path) -> None:
    """Grouped bars: per organ, each strategy's mean Dice over seeds at ``fraction`` (± std)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_cell = organ_means([r for r in cases if math.isclose(float(r["fraction"]), fraction)])
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
    ax.set_title(f"Per-organ Dice at label fraction {fraction:g}")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_report(cfg: BenchmarkConfig, plan: Plan) -> Path:
    """Write every report file into ``cfg.output_dir`` from the finished cells; returns ``summary.md``."""
    out = Path(cfg.output_dir)
    cases, records = collect(plan)
    _write_csv(out / "cases.csv", cases, CASE_COLUMNS)
    _write_csv(out / "results.csv", organ_rows(cases, records), RESULT_COLUMNS)
    plots: list[tuple[str, str]] = []
    if cases:
        fractions = sorted(cfg.fractions)
        table = mean_std_table(cases)
        plot_dice_vs_fraction(table, cfg.strategies, fractions, out / "dice_vs_fraction.png")
        lowest = min(float(r["fraction"]) for r in cases)
        name = f"organ_dice_f{lowest:g}.png"
        plot_organ_dice(cases, cfg.strategies, lowest, out / name)
        plots = [
            (
                "dice_vs_fraction.png",
                "mean test Dice against label fraction per strategy (± std over seeds).",
            ),
            (name, f"per-organ test Dice per strategy at the lowest finished fraction ({lowest:g})."),
        ]
    summary = out / "summary.md"
    atomic_write_text(summary, write_summary(cfg, plan, cases, records, plots))
    return summary
