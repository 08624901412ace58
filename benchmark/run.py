"""``mosmos benchmark --config FILE``: initialisation strategy × label fraction × seed, on one target.

Each cell of the grid is a stage 2 run on ``data.target`` with a share ``fraction`` of its training
cases, seeded by ``seed``, its encoder initialised by ``strategy`` (see :mod:`mosmos.benchmark.config`);
the best weights by validation Dice are then scored on the labelled ``data.test`` (only the organs the
target labels). A cell of the partial-label axis (``partial_strategies``) trains one model on the
target (at the budget) and the whole ``data.other_datasets`` with one partial-label strategy, from
``partial_init``, and is scored the same way: the target's task, the target's organs. A cell trains
the fine-tuning config's budget (``train.epochs`` / ``train.max_steps``), or stops earlier after
``train.early_stopping_patience`` validations without a better mean Dice; the summary says which.
Snapshots at ``curve_points`` of the budget are scored too (the learning curves).

Pretraining variants and cells are planned first (:mod:`mosmos.benchmark.plan`). Every run resumes
(``train.resume=latest``), so a second call skips finished work and continues unfinished work. The
report (``results.csv``, ``cases.csv``, ``summary.md``, plots) is regenerated from the finished cells
at the end of every call, also when a cell fails or is interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from mosmos.benchmark.config import BenchmarkConfig
from mosmos.benchmark.plan import (
    CELL_FILE,
    CURVE_TEST_PREFIX,
    DONE_FILE,
    Cell,
    Variant,
    check_stale,
    last_record,
    make_plan,
)
from mosmos.benchmark.report import write_report
from mosmos.benchmark.steps import step_cap
from mosmos.config import dump_config, load_config
from mosmos.engine.checkpoints import list_snapshots
from mosmos.errors import MosmosError
from mosmos.export_format import Preprocessing
from mosmos.export_write import write_encoder_export
from mosmos.finetune.evaluate import evaluate_run
from mosmos.finetune.inference import load_model
from mosmos.finetune.predict import read_spec
from mosmos.finetune.train import BEST_FILE, SPLIT_FILE
from mosmos.finetune.train import run as run_finetune
from mosmos.io import atomic_write_text, library_versions, write_json
from mosmos.pretrain.train import run as run_pretrain

logger = logging.getLogger("mosmos")

__all__ = ["export_segmenter_encoder", "main", "run_benchmark", "run_variant", "train_and_evaluate"]


def export_segmenter_encoder(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export a stage 2 run's encoder in the stage 1 format, so ``model.init=PATH`` loads it.

    The export holds the segmenter's encoder with the run's preprocessing; no organs and no tag
    head; its objective names the supervised datasets.

    Args:
        run_dir: a stage 2 run directory (``model.safetensors`` + ``model.json``).
        out_dir: where the export goes (default: ``run_dir``).

    Returns:
        The folder holding the export.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    model, spec = load_model(run_dir)
    pre = spec.preprocess
    write_encoder_export(
        out_dir,
        spec.encoder,
        model.encoder,
        Preprocessing(pre["spacing"], pre["size"], pre["hu_window"], pre["body_threshold_hu"]),
        objective={"supervised": "multidataset", "datasets": spec.task_names},
    )
    return out_dir


def run_variant(variant: Variant) -> None:
    """Train one pretraining variant (resuming a crashed attempt) and export its encoder."""
    if variant.name == "multidataset":
        if run_finetune(variant.config):
            export_segmenter_encoder(variant.dir)
    else:
        run_pretrain(variant.config)


def train_and_evaluate(cell: Cell, cfg: BenchmarkConfig) -> dict:
    """Train one cell (resuming), score its best-validation weights on ``data.test``.

    Each learning-curve snapshot the training wrote (``cell.curve``) is scored the same way into
    ``test_step_<step>/``.

    Returns:
        What ``DONE.json`` records besides the cell's identity: timing, steps, best epoch, the
        scored curve points.

    Raises:
        KeyboardInterrupt: when the training was interrupted (it saved a checkpoint to resume from).
    """
    resumed = (cell.dir / "checkpoints").is_dir()
    t0 = time.time()
    best = run_finetune(cell.config)
    train_seconds = time.time() - t0
    if not best:
        print(f"benchmark: {cell.dir}: training interrupted; run the benchmark again to resume")
        raise KeyboardInterrupt
    t1 = time.time()
    # the plan lists the target first in data.datasets, so its task is the first; a partial-label
    # model is asked for the target's task (its task token, where the network has them)
    target = read_spec(cell.dir).tasks[0]

    def score(model_dir: Path, out: Path) -> None:
        evaluate_run(
            model_dir,
            cfg.data.test,
            out,
            task=target["name"] if cell.axis == "partial_label" else None,
            device=cfg.eval.device,
            overlap=cfg.eval.overlap,
            sw_batch_size=cfg.eval.sw_batch_size,
        )

    score(cell.dir, cell.dir / "test")
    # the learning curve: each snapshot the training wrote, scored the same way (a step the run never
    # reached, or a cell trained before it had curve points, has none)
    snapshots = list_snapshots(cell.dir)
    curve = []
    for step, share in cell.curve.items():
        out = cell.dir / f"{CURVE_TEST_PREFIX}{step}"
        if step in snapshots:
            if not (out / "cases.csv").is_file():  # scored before the benchmark was interrupted
                score(snapshots[step], out)
            curve.append({"step": step, "fraction": share})
    last = last_record(cell.dir)
    best_json = json.loads((cell.dir / BEST_FILE).read_text(encoding="utf-8"))
    split_path = cell.dir / SPLIT_FILE  # mutual learning writes none
    split = json.loads(split_path.read_text(encoding="utf-8")) if split_path.is_file() else {}
    n_train = sum(c["dataset"] == target["name"] for c in split["train"]) if "train" in split else None
    return {
        "target_organs": list(target["organs"]),  # the organs scored (collect drops the others)
        "n_train_cases": n_train,  # of the target
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(time.time() - t1, 2),
        "resumed": resumed,
        "steps": last.get("step"),
        "best_epoch": best_json.get("epoch"),
        "best_val_mean_dice": best_json.get("mean_dice"),
        "step_cap": step_cap(cell.config),
        "curve": curve,  # the scored learning-curve points, each in test_step_<step>/
    }


def _ensure_variant(variant: Variant) -> None:
    if variant.done:
        return
    print(f"benchmark: pretraining variant {variant.name} in {variant.dir}")
    run_variant(variant)
    if not variant.done:
        print(f"benchmark: {variant.dir}: pretraining stopped before its export; run again to resume")
        raise KeyboardInterrupt


def _run_cell(cell: Cell, cfg: BenchmarkConfig) -> None:
    write_json(cell.dir / CELL_FILE, {"config_hash": cell.config_hash})
    record = train_and_evaluate(cell, cfg)
    write_json(
        cell.dir / DONE_FILE,
        {
            "strategy": cell.strategy,
            "axis": cell.axis,
            "datasets": list(cell.config.data.datasets),
            "budget": cell.budget,
            "fraction": cell.fraction,
            "seed": cell.seed,
            "init": cell.config.model.init,
            "attention_maps": cell.config.model.attention_maps,
            "config_hash": cell.config_hash,
            **record,
        },
    )


def run_benchmark(cfg: BenchmarkConfig) -> Path:
    """Run (or continue) the grid and write the report.

    Returns:
        The path of ``summary.md``.
    """
    plan = make_plan(cfg)
    check_stale(plan)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    write_json(out / "versions.json", library_versions())
    todo = [cell for cell in plan.cells if not cell.done]
    axes = f"{len(cfg.strategies)} strategies"
    if cfg.partial_strategies:
        axes += f" + {len(cfg.partial_strategies)} partial-label strategies at {cfg.partial_init}"
    print(
        f"benchmark: {len(plan.cells)} cells (({axes}) x {len(cfg.budgets)} label budgets {cfg.budgets} x "
        f"{len(cfg.seeds)} seeds), {len(plan.cells) - len(todo)} finished, {len(todo)} to run"
    )
    try:
        for name in dict.fromkeys(cell.variant for cell in todo if cell.variant):
            _ensure_variant(plan.variants[name])
        bar = tqdm(total=len(plan.cells), initial=len(plan.cells) - len(todo), desc="benchmark", unit="cell")
        try:
            for cell in todo:
                bar.set_postfix_str(f"{cell.strategy} {cell.budget} s={cell.seed}")
                _run_cell(cell, cfg)
                bar.update(1)
        finally:
            bar.close()
    except BaseException:  # an error or Ctrl-C: report what finished, then let it propagate
        if any(cell.done for cell in plan.cells):
            try:
                write_report(cfg, plan)
            except (MosmosError, OSError, ValueError) as exc:
                logger.warning("could not update the benchmark report: %s", exc)
        raise
    summary = write_report(cfg, plan)
    print(f"benchmark finished: {summary}")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/benchmark/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seeds=[0,1] fractions=[0.5]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mosmos benchmark", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = load_config(BenchmarkConfig, args.config, args.overrides)
    run_benchmark(cfg)
    return 0
