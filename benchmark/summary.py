"""The benchmark's ``summary.md``: the budget and recipes, the tables of case-level means with their
hierarchical bootstrap intervals, and the paired comparisons (Wilcoxon on case means, Holm within
each family) of the initialisation axis and of the partial-label axis; generated from the numbers only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mosmos.benchmark.comparisons import (
    TABLE_NOTE,
    comparison_family,
    count_text,
    family_lines,
    format_interval_table,
    init_sections,
    interval_table,
)
from mosmos.benchmark.config import (
    PARTIAL_PREFIX,
    PARTIAL_STRATEGIES,
    BenchmarkConfig,
    budget_label,
)
from mosmos.benchmark.plan import Plan, Variant, last_record
from mosmos.benchmark.stats import (
    budget_of,
)
from mosmos.benchmark.steps import step_cap

__all__ = ["DESCRIPTIONS", "PARTIAL_DESCRIPTIONS", "write_summary"]

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
    "shuffled_variant+masks": "the mosmos_variant+masks stage 1 (the same masks), every scan paired "
    "with another scan's report",
    "mosmos_variant+attention": "the mosmos_variant encoder, plus its attention maps fed to the decoder",
    "mosmos+masks+attention": "the mosmos+masks encoder, plus its attention maps fed to the decoder",
    "mosmos_variant+masks+attention": "the mosmos_variant+masks encoder, plus its attention maps fed "
    "to the decoder",
    "shuffled_variant+masks+attention": "the shuffled_variant+masks encoder, plus its attention maps "
    "fed to the decoder",
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
            f"{variant.dir} and shared by its cells{_stage1_scores(variant)}."
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


#: The stage 1 held-out scores the summary quotes for each pretraining variant (metrics.json keys).
STAGE1_SCORES = (
    ("tag_present_AUROC", "present-tag AUROC"),
    ("tag_abnormal_AUROC", "abnormal-tag AUROC"),
    ("tag_mAP", "tag mAP"),
    ("pointing_game", "pointing game"),
    ("i2t_R@1", "image-to-report R@1"),
)


def _stage1_scores(variant: Variant) -> str:
    """``; held-out scores at step N: ...`` of a finished stage 1 variant, so the reader sees what the
    encoder had learned before any cell used it; empty for a stage 2 variant or one not evaluated yet."""
    if variant.name == "multidataset" or not variant.done:
        return ""
    record = last_record(variant.dir)
    scores = [f"{label} {record[key]:.3f}" for key, label in STAGE1_SCORES if record.get(key) is not None]
    if not scores:
        return ""
    at = f" at step {record['step']}" if record.get("step") is not None else ""
    return f"; its held-out scores{at}: {', '.join(scores)}"


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
    sections = init_sections(strategies)
    family = "the initialisation comparisons" if cfg.partial_strategies else "this summary"
    return lines + family_lines(comparison_family(cases, budgets, sections), "##", family)


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
    lines += family_lines(
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
    seeds_text = f"{count_text(len(cfg.seeds), 'fine-tuning seed')} {list(cfg.seeds)}"
    if cfg.pretrain_seeds is not None:
        seeds_text += f", paired with pretraining seeds {list(cfg.pretrain_seeds)}"
    title = "Initialisation benchmark"
    if cfg.partial_strategies:
        title = "Initialisation and partial-label benchmark" if strategies else "Partial-label benchmark"
    lines = [
        f"# {title}",
        "",
        f"Fine-tuning target `{cfg.data.target}`; test set `{cfg.data.test}` "
        f"({count_text(len(test_cases), 'case')}; "
        f"organs scored, those both the target and the test set label: {', '.join(organs) or 'none yet'}). "
        f"{len(records)} of {len(plan.cells)} cells finished ({grid} x "
        f"{count_text(len(budgets), 'label budget')} x {seeds_text}).",
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
