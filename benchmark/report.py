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
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mosmos.benchmark.config import PARTIAL_PREFIX, PARTIAL_STRATEGIES, BenchmarkConfig, budget_label
from mosmos.benchmark.plan import CURVE_TEST_PREFIX, DONE_FILE, Plan, axis_of, step_cap
from mosmos.benchmark.stats import (
    MIN_NONZERO_PAIRS,
    BootstrapCI,
    Comparison,
    budget_of,
    compare,
    curve_means,
    holm,
    organ_means,
    strategy_interval,
)
from mosmos.errors import DataError
from mosmos.io import atomic_path, atomic_write_text

__all__ = [
    "CASE_COLUMNS",
    "CURVE_COLUMNS",
    "RESULT_COLUMNS",
    "collect",
    "collect_curves",
    "curve_rows",
    "dodged_positions",
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
DESCRIPTIONS = {
    "random": "no pretraining (random initialisation)",
    "mosmos": "stage 1 with the paper's objective (contrastive + organ tags, both training the encoder)",
    "mosmos_variant": "stage 1 with the paper's objective and the departures in objective_variants",
    "contrastive_only": "stage 1 with the tag terms off (contrastive only)",
    "tags_only": "stage 1 with the contrastive and embedding-tag terms off (tags only)",
    "mosmos+attention": "the mosmos encoder, plus its pixel-tag attention maps fed to the decoder",
    "multidataset": "supervised stage 2 pretraining on data.other_datasets, encoder and decoder "
    "transferred, the new head warmed up alone first (MultiTalent)",
    "mosmos+masks": "the mosmos stage 1 with a few labelled scans supervising the attention maps "
    "(data.mask_datasets)",
    "mosmos_variant+masks": "the mosmos_variant stage 1 with a few labelled scans supervising the "
    "attention maps (data.mask_datasets)",
    "shuffled_variant": "the mosmos_variant stage 1, every scan paired with another scan's report",
    "shuffled_tags": "the mosmos stage 1, every scan paired with another scan's report (same compute, "
    "no true pairing)",
}
PARTIAL_DESCRIPTIONS = {
    "masked": "BCE + soft Dice on the organs each sample's dataset labels, averaged per organ",
    "multitalent": "BCE + batch Dice on each dataset's valid channels, summed over channels "
    "(MultiTalent, Ulrich et al. 2023)",
    "marginal": "softmax with the organs a dataset does not label merged into its background "
    "(marginal loss, Shi et al. 2021)",
    "task_tokens": "the masked loss on MO-CTranS, one learned task token per dataset, tested with the "
    "target's token",
    "mutual": "deep mutual learning: per-dataset model cohorts, pseudo labels, then full-organ models "
    "(Liu et al. 2024)",
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


def _signed(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:+.{digits}f}".replace("-0." + "0" * digits, "+0." + "0" * digits)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _comparison_text(c: Comparison) -> str:
    head = f"{budget_label(c.budget)}: {c.strategy} vs {c.baseline}"
    if not c.diff.n_seeds or not c.diff.n_cases:
        return f"{head}: not compared (no finished cells of one of them)"
    text = (
        f"{head}: {c.diff.format(signed=True)} mean Dice difference per test case (95 % CI; "
        f"{_count(c.diff.n_seeds, 'seed')} x {_count(c.diff.n_cases, 'test case')}); Wilcoxon signed-rank "
        f"on the {c.test.n} per-case differences averaged over seeds: "
    )
    if c.test.p is None:
        return text + c.test.format_p()
    return text + f"p={c.test.p:.3g}, Holm-adjusted p={c.p_adjusted:.3g}"


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
    patience = cfg.train.early_stopping_patience
    stopping = (
        "There is no early stopping: every cell trains the whole budget"
        if patience is None
        else f"A cell stops after {patience} validation evaluation(s) without a better mean Dice (the budget "
        "above is the cap)"
    )
    lines = [
        f"- Cap per cell ({budget}, train.batch_size={ft.train.batch_size}, model {ft.model.name}); "
        f"optimizer steps per cell: {step_text}. {stopping}. Each cell is validated every "
        f"{ft.train.eval_every} epoch(s) and at its end on held-out target cases "
        f"(data.val_fraction={ft.data.val_fraction}) and scored on the test set with the weights of its "
        "best validation evaluation.",
        f"- Voxel spacing of every cell: {list(ft.data.spacing) if ft.data.spacing else 'from the stage 1 export'}"
        f" (random and multidataset cells: {_preprocess_of(plan)}).",
        "- Transfer recipe of the pretrained cells (train.pretrained_overrides): "
        f"{list(cfg.train.pretrained_overrides) or 'none (the fine-tuning config as it is)'}; recipe of the "
        f"random cells (train.random_overrides): {list(cfg.train.random_overrides) or 'none'}.",
    ]
    n_train = sorted(
        {(budget_of(r), r["n_train_cases"]) for r in records if r.get("n_train_cases") is not None}
    )
    if n_train:
        lines.append(
            "- Labelled training cases per budget: "
            + ", ".join(f"{budget_label(b)}: {n}" for b, n in n_train)
            + "."
        )
    best_epochs = [r["best_epoch"] for r in records if r.get("best_epoch") is not None]
    if best_epochs:
        lines.append(
            f"- Best validation epoch per cell: median {float(np.median(best_epochs)):g}, "
            f"range {min(best_epochs)} to {max(best_epochs)}."
        )
    for name, variant in plan.variants.items():
        vt = variant.config.train
        size = f"train.max_steps={vt.max_steps}" if vt.max_steps else f"train.epochs={vt.epochs}"
        kind = "stage 2 supervised" if variant.name == "multidataset" else "stage 1"
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


def _curve_lines(cfg: BenchmarkConfig, plan: Plan, records: list[dict[str, Any]]) -> list[str]:
    """The one sentence on the learning curves: which steps were scored, and what the last point is."""
    if not cfg.curve_points:
        return []
    caps = sorted({cap for c in plan.cells if c.curve and (cap := step_cap(c.config)) is not None})
    steps = sorted({step for c in plan.cells for step in c.curve})
    scored = sum(bool(r.get("curve")) for r in records)
    if not steps:
        return [
            f"- Learning curves (curve_points={list(cfg.curve_points)}): none, no cell has a step cap known "
            "from its config (data.samples_per_epoch or train.max_steps) or every cell is mutual learning."
        ]
    return [
        f"- Learning curves: each cell's weights after optimizer step{'s' if len(steps) > 1 else ''} "
        f"{', '.join(map(str, steps))} "
        f"(curve_points={list(cfg.curve_points)} of its step cap, {', '.join(map(str, caps))}) are also "
        f"scored on the test set, as its own score is ({scored} of {len(records)} finished cells have "
        "them); the last point of each curve is the cell's own score, with its best-validation weights."
    ]


def _preprocess_of(plan: Plan) -> str:
    random_cells = [c for c in plan.cells if c.config.model.init == "random"]
    if not random_cells:
        return "none in this grid"
    d = random_cells[0].config.data
    return f"spacing {d.spacing}, HU window {d.hu_window}"


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


def _family_lines(planned: list[tuple[str, list[Comparison]]], heading: str, family: str) -> list[str]:
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


def _init_lines(cfg: BenchmarkConfig, cases: list[dict[str, Any]]) -> list[str]:
    """The initialisation axis: its table and comparisons."""
    strategies, budgets = list(cfg.strategies), cfg.budgets
    lines = [
        "## Mean test Dice",
        "",
        TABLE_NOTE,
        "",
        format_interval_table(interval_table(cases, strategies, budgets), strategies, budgets),
        "",
    ]
    controls = ("random", "shuffled_tags", "shuffled_variant")
    variant_family = ("mosmos_variant", "mosmos_variant+masks")  # controlled by shuffled_variant
    sections = [
        ("random", "Against random initialisation", [s for s in strategies if s != "random"]),
        (
            "shuffled_tags",
            "Against the shuffled-report control (shuffled_tags, the paper's objective)",
            [s for s in strategies if s not in controls and s not in variant_family],
        ),
        (
            "shuffled_variant",
            "Against the shuffled-report control of the variant (shuffled_variant)",
            [s for s in strategies if s in variant_family],
        ),
        # what a few masks add to the same stage 1 objective
        (
            "mosmos",
            "What the masks add (mosmos+masks against mosmos)",
            [s for s in strategies if s == "mosmos+masks"],
        ),
        (
            "mosmos_variant",
            "What the masks add (mosmos_variant+masks against mosmos_variant)",
            [s for s in strategies if s == "mosmos_variant+masks"],
        ),
    ]
    sections = [sec for sec in sections if sec[2]]
    sections = [sec for sec in sections if sec[0] in strategies]
    family = "the initialisation comparisons" if cfg.partial_strategies else "this summary"
    return lines + _family_lines(comparison_family(cases, budgets, sections), "##", family)


def _init_description(strategy: str) -> str:
    return DESCRIPTIONS.get(
        strategy, "a user-supplied encoder (model.init=" + strategy.split(":", 1)[-1] + ")"
    )


def _partial_lines(cfg: BenchmarkConfig, plan: Plan, cases: list[dict[str, Any]]) -> list[str]:
    """The partial-label axis: what its cells train on and are scored on, its table, its comparisons
    against the first listed strategy (a Holm family of their own) and each strategy's stage 2 setup."""
    names = [f"{PARTIAL_PREFIX}{n}" for n in cfg.partial_strategies]
    budgets = cfg.budgets
    rows = [r for r in cases if r["axis"] == "partial_label"]
    organs = sorted({r["organ"] for r in rows})
    others = ", ".join(f"`{d}`" for d in cfg.data.other_datasets)
    baseline = names[0]
    lines = [
        f"## Partial-label strategies (initialisation: {cfg.partial_init})",
        "",
        "Each cell trains one stage 2 model with one partial-label strategy:",
        "",
        f"- its encoder initialised by `{cfg.partial_init}`: {_init_description(cfg.partial_init)};",
        f"- on the target `{cfg.data.target}` at the label budget, together with every training case of "
        f"{others} (the budget subsets the target's training cases only);",
        "- with the weights of its best mean validation Dice over held-out cases of every dataset (the "
        "target's held-out cases are those of the initialisation cells);",
        "- tested with the target's task. Organs scored (both the target and the test set label them): "
        f"{', '.join(organs) or 'none yet'}; the organs only the other datasets label are segmented but "
        "not scored.",
        "",
        TABLE_NOTE,
        "",
        format_interval_table(interval_table(cases, names, budgets), names, budgets),
        "",
    ]
    section = (baseline, f"Against `{baseline}` (the first partial-label strategy)", names[1:])
    lines += _family_lines(
        comparison_family(cases, budgets, [section]), "###", "the partial-label comparisons"
    )
    lines += ["### Partial-label strategies", ""]
    for name in cfg.partial_strategies:
        cell = next(c for c in plan.cells if c.strategy == f"{PARTIAL_PREFIX}{name}")
        ft = cell.config
        extra = cfg.partial_overrides.get(name, [])
        lines.append(
            f"- `{PARTIAL_PREFIX}{name}`: {PARTIAL_DESCRIPTIONS[name]}; network {ft.model.name}, "
            f"train.strategy={ft.train.strategy}, overrides {[*PARTIAL_STRATEGIES[name], *extra]}."
        )
    return [*lines, ""]


def write_summary(
    cfg: BenchmarkConfig,
    plan: Plan,
    cases: list[dict[str, Any]],
    records: list[dict[str, Any]],
    plots: list[tuple[str, str]],
    curves: bool = False,
) -> str:
    """The text of ``summary.md`` (``curves``: ``curves.csv`` was written)."""
    strategies, budgets = list(cfg.strategies), cfg.budgets
    test_cases = sorted({(r["dataset"], r["case"]) for r in cases})
    axes = []
    if strategies:
        axes.append(f"{len(strategies)} strateg{'y' if len(strategies) == 1 else 'ies'}")
    if cfg.partial_strategies:
        n = len(cfg.partial_strategies)
        axes.append(f"{n} partial-label strateg{'y' if n == 1 else 'ies'}")
    grid = axes[0] if len(axes) == 1 else f"({' + '.join(axes)})"
    organs = sorted({r["organ"] for r in cases})
    seeds_text = f"{_count(len(cfg.seeds), 'fine-tuning seed')} {list(cfg.seeds)}"
    if cfg.pretrain_seeds is not None:
        seeds_text += f", paired with pretraining seeds {list(cfg.pretrain_seeds)}"
    title = "Initialisation benchmark"
    if cfg.partial_strategies:
        title = "Initialisation and partial-label benchmark" if strategies else "Partial-label benchmark"
    lines = [
        f"# {title}",
        "",
        f"Fine-tuning target `{cfg.data.target}`; test set `{cfg.data.test}` "
        f"({_count(len(test_cases), 'case')}; "
        f"organs scored, those both the target and the test set label: {', '.join(organs) or 'none yet'}). "
        f"{len(records)} of {len(plan.cells)} cells finished ({grid} x "
        f"{_count(len(budgets), 'label budget')} x {seeds_text}).",
        "",
        "## Budget",
        "",
        *_budget_lines(cfg, plan, records),
        *_curve_lines(cfg, plan, records),
        "",
    ]
    if strategies:
        lines += _init_lines(cfg, cases)
    if cfg.partial_strategies:
        lines += _partial_lines(cfg, plan, cases)
    if strategies:
        lines += ["## Strategies", ""]
        lines += [f"- `{s}`: {_init_description(s)}." for s in strategies]
        lines.append("")
    lines += [
        "## Files",
        "",
        "- `results.csv`: one row per cell x organ (mean over test cases), with training time.",
        "- `cases.csv`: one row per cell x test case x organ (the paired tests' input); `axis` is "
        "`initialisation` or `partial_label`.",
        *(
            [
                "- `curves.csv`: one row per cell x learning-curve point (step, share of the step cap, "
                "`weights` snapshot or best_validation, mean test Dice per case)."
            ]
            if curves
            else []
        ),
        *(f"- `{name}`: {desc}" for name, desc in plots),
        "- `config.yaml`, `versions.json`: the resolved benchmark config and library versions.",
        "- `runs/<strategy>/<budget>_s<seed>/`: each cell's run (`test/` holds its test scores; "
        "`split.json` its training and validation cases); a budget is `f<share>` or `n<cases>`.",
    ]
    if cfg.partial_strategies:
        lines.append(
            "- `runs/partial-<name>/<budget>_s<seed>/`: the partial-label cells (`test/` scores every organ "
            "the model and the test set share; the summary and the CSVs keep the target's)."
        )
    lines += ["- `pretrain/<variant>-<config hash>/`: the pretraining runs.", ""]
    return "\n".join(lines)


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
