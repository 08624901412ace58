"""``make demo``: the pipeline on generated data, on CPU, stage by stage, with a one-line result each.

synth -> stage 1 pretraining -> stage 2 fine-tuning on three partially labelled datasets (from the
stage 1 encoder) -> evaluation on the fully labelled generated test set -> prediction of one scan ->
a small initialisation benchmark -> ``OUT/summary.md`` (results, attention montages, a prediction
overlay, the benchmark plot).

Two budgets:

* ``quick`` (the default, about ten minutes on two CPU cores): the shipped demo configs with the
  overrides of :data:`QUICK` (printed in the summary, so every stage can be rerun by hand). Stage 1
  is ``mosmos+masks`` on the demo recipe: ten labelled scans of the two non-target datasets supervise
  the attention maps, which makes the tags and the organs' locations learnable in 150 steps
  (docs/results/localisation.md); the benchmark compares random initialisation with this encoder on
  two labelled cases, two seeds, a few dozen steps per cell: a smoke test of the protocol, too small
  to separate strategies (the summary says so when its interval holds zero).
* ``full`` (``mosmos demo --full``): the configs as shipped (stage 1 990 steps, report supervision
  only; the benchmark of configs/benchmark/demo.yaml): an hour or more on two cores.

Every stage resumes: rerunning the demo skips finished work (the two budgets write to different
folders under ``OUT``).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from mosmos.cli.demo_summary import organ_dice, prediction_overlay, write_summary
from mosmos.resources import configs_dir

_SEG_DATASETS = ("Dataset011_AbdomenA", "Dataset012_KidneyB", "Dataset013_VesselsC")
_TARGET = "Dataset012_KidneyB"  # the benchmark's fine-tuning target
_MASK_DATASETS = ("Dataset011_AbdomenA", "Dataset013_VesselsC")  # not the target: no extra target labels
_TEST_DATASET = "Dataset099_SynthTest"

#: The quick demo's overrides of the shipped demo configs, per stage ("{data}" is OUT/data).
QUICK: dict[str, list[str]] = {
    "pretrain": [
        "train.epochs=5",  # 150 steps of batch 16
        "train.eval_every=5",
        "train.checkpoint_every=60",
        "data.mask_datasets=[" + ",".join("{data}/nnUNet_raw/" + d for d in _MASK_DATASETS) + "]",
        "data.mask_max_cases=5",
        "data.mask_ratio=0.25",
    ],
    "finetune": [
        "train.epochs=2",  # 2 x 96 patches / batch 2 = 96 steps
        "train.eval_every=1",
        "train.checkpoint_every=100",
        "train.warmup_steps=20",
    ],
    # no learning-curve points: each would cost a test-set evaluation per cell
    "benchmark": ["label_cases=[2]", "fractions=[]", "seeds=[0,1]", "curve_points=[]"],
    # appended to the benchmark config's finetune_overrides (every cell): 4 x 24 / 2 = 48 steps
    "benchmark_cells": ["train.epochs=4", "train.eval_every=2"],
}


def _fill(overrides: list[str], data: Path) -> list[str]:
    return [o.replace("{data}", str(data)) for o in overrides]


def _seconds(t0: float) -> str:
    return f"{time.time() - t0:.0f} s"


def _stage1(
    configs: Path, data: Path, run: Path, cache: Path, seed: int, budget: dict[str, list[str]] | None
) -> tuple[str, dict]:
    from mosmos.config import load_config
    from mosmos.pretrain.config import PretrainConfig
    from mosmos.pretrain.train import run as run_pretrain

    t0 = time.time()
    cfg = load_config(
        PretrainConfig,
        configs / "pretrain" / "demo.yaml",
        [
            f"output_dir={run}",
            f"seed={seed}",
            f"data.table={data / 'pretrain' / 'reports.csv'}",
            f"data.image_root={data / 'pretrain' / 'images'}",
            f"data.ground_truth={data / 'pretrain' / 'ground_truth'}",
            f"data.cache_dir={cache}",
            "train.resume=latest",
            *(_fill(budget["pretrain"], data) if budget else []),
        ],
    )
    if (run / "encoder.safetensors").is_file() and (run / "metrics.json").is_file():
        print("      (already trained; delete the folder to retrain)")
    else:
        run_pretrain(cfg)
    final = json.loads((run / "metrics.json").read_text(encoding="utf-8")).get("final", {})
    steps = final.get("step", "?")
    line = (
        f"{steps} steps in {_seconds(t0)}: held-out tag AUROC present {final.get('tag_present_AUROC', math.nan):.2f}"
        f" / abnormal {final.get('tag_abnormal_AUROC', math.nan):.2f}, pointing game "
        f"{final.get('pointing_game', math.nan):.2f} (chance {final.get('pointing_game_chance', 0.007):.3f}), "
        f"retrieval R@5 {final.get('i2t_R@5', math.nan):.2f} (chance {5 * final.get('retrieval_chance_R@1', math.nan):.2f})"
    )
    return line, final


def _stage2(
    configs: Path,
    data: Path,
    run: Path,
    init: Path,
    cache: Path,
    seed: int,
    budget: dict[str, list[str]] | None,
) -> str:
    from mosmos.config import load_config
    from mosmos.finetune.config import FinetuneConfig
    from mosmos.finetune.train import run as run_finetune

    t0 = time.time()
    nnunet = data / "nnUNet_raw"
    cfg = load_config(
        FinetuneConfig,
        configs / "finetune" / "demo.yaml",
        [
            f"output_dir={run}",
            f"seed={seed}",
            "data.datasets=[" + ",".join(str(nnunet / d) for d in _SEG_DATASETS) + "]",
            f"data.cache_dir={cache}",
            f"model.init={init}",
            "train.resume=latest",
            *(budget["finetune"] if budget else []),
        ],
    )
    if (run / "model.safetensors").is_file() and (run / "metrics.json").is_file():
        print("      (already trained; delete the folder to retrain)")
        best = json.loads((run / "metrics.json").read_text(encoding="utf-8")).get("best", {})
    else:
        best = run_finetune(cfg) or {}
    dice = best.get("mean_dice", best.get("val_mean_dice", math.nan))
    return f"trained in {_seconds(t0)}; best validation mean Dice {dice:.3f}"


def _evaluate(model: Path, test: Path, out: Path) -> tuple[str, dict]:
    from mosmos.finetune.evaluate import evaluate_run

    t0 = time.time()
    summary = evaluate_run(model, test, out)
    cases = json.loads((out / "metrics.json").read_text(encoding="utf-8")).get("cases", "?")
    line = (
        f"mean Dice {summary.get('mean_dice', math.nan):.3f} over {cases} test cases "
        f"and {len(organ_dice(summary))} organs ({_seconds(t0)})"
    )
    return line, summary


def _predict(model: Path, test: Path, out: Path) -> tuple[str, Path, Path]:
    from mosmos.finetune.predict import list_inputs, predict

    t0 = time.time()
    scan = list_inputs(test / "imagesTs" if (test / "imagesTs").is_dir() else test / "imagesTr")[0]
    written = predict(model, scan, out)
    return f"{scan.name} -> {written[0].relative_to(out.parent.parent)} ({_seconds(t0)})", scan, written[0]


def _benchmark(
    configs: Path,
    data: Path,
    out: Path,
    encoder: Path,
    cache: Path,
    seed: int,
    budget: dict[str, list[str]] | None,
) -> Path:
    from mosmos.benchmark.config import BenchmarkConfig
    from mosmos.benchmark.run import run_benchmark
    from mosmos.config import load_config

    nnunet = data / "nnUNet_raw"
    overrides = [
        f"output_dir={out}",
        f"seed={seed}",
        f"data.target={nnunet / _TARGET}",
        f"data.test={nnunet / _TEST_DATASET}",
        f"data.pretrain_table={data / 'pretrain' / 'reports.csv'}",
        f"data.pretrain_image_root={data / 'pretrain' / 'images'}",
        f"data.pretrain_ground_truth={data / 'pretrain' / 'ground_truth'}",
        "data.other_datasets=[" + ",".join(str(nnunet / d) for d in _MASK_DATASETS) + "]",
        f"data.cache_dir={cache}",
    ]
    if budget:
        overrides += [f"strategies=[random,checkpoint:{encoder}]", *budget["benchmark"]]
    cfg = load_config(BenchmarkConfig, configs / "benchmark" / "demo.yaml", overrides)
    if budget:
        cfg.finetune_overrides = [*cfg.finetune_overrides, *budget["benchmark_cells"]]
    return run_benchmark(cfg)


def _benchmark_line(bench: Path) -> tuple[str, list[str]]:
    """The benchmark's one-line result (each pretrained strategy against random) and its comparisons."""
    import csv

    from mosmos.benchmark.stats import compare

    with open(bench / "cases.csv", newline="", encoding="utf-8") as fh:
        rows = [{**r, "seed": int(r["seed"]), "dice": float(r["dice"])} for r in csv.DictReader(fh)]
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    lines, separated = [], False
    for budget in budgets:
        for strategy in strategies:
            if strategy == "random":
                continue
            c = compare(rows, strategy, "random", budget)
            name = "the stage 1 encoder" if strategy.startswith("checkpoint:") else strategy
            lines.append(
                f"{name} vs random at {budget}: {c.diff.format(signed=True)} mean test Dice per case "
                f"({c.test.format_p()})"
            )
            # separated: the interval excludes zero and the paired test (enough cases to run) agrees
            separated |= not (c.diff.low <= 0.0 <= c.diff.high) and c.test.p is not None and c.test.p < 0.05
    verdict = (
        "a difference at this small budget; whether it holds at a converged one is what the study in "
        "docs/results/init-benchmark.md measures"
        if separated
        else "this budget cannot separate the strategies; the study with enough steps, seeds and label "
        "budgets is docs/results/init-benchmark.md"
    )
    return "; ".join(lines) + f" — {verdict}", lines


def run_demo(
    out: Path,
    seed: int = 0,
    configs: Path | None = None,
    full: bool = False,
    budget: dict[str, list[str]] | None = None,
) -> int:
    """Run the demo into ``out``; ``budget`` replaces :data:`QUICK` (per-stage overrides; tests use it)."""
    from mosmos.synth import synthesize

    configs = configs or configs_dir()
    out = Path(out)
    quick = not full
    budget = None if full else (QUICK if budget is None else budget)
    data, cache = out / "data", out / "cache"
    runs = out / ("quick" if quick else "full")
    t0 = time.time()
    lines: dict[str, str] = {}

    def report(stage: str, text: str) -> None:
        lines[stage] = text
        print(f"      -> {text}", flush=True)

    print(f"[1/6] synth: generating phantoms, reports and partially labelled datasets in {data}", flush=True)
    t = time.time()
    if (data / "synth.json").is_file():
        print("      (already there; delete the folder to regenerate)")
    else:
        synthesize(data, seed=seed, workers=os.cpu_count() or 1)
    pairs = sum(1 for _ in (data / "pretrain" / "images").glob("*.nii.gz"))
    report("synth", f"{pairs} image-report pairs, 3 partially labelled datasets, a test set ({_seconds(t)})")

    stage1 = runs / "pretrain"
    print(f"[2/6] pretrain: stage 1 on {data / 'pretrain' / 'reports.csv'} -> {stage1}", flush=True)
    line, _final = _stage1(configs, data, stage1, cache, seed, budget)
    report("stage 1 pretrain", line)

    stage2 = runs / "finetune"
    print(f"[3/6] finetune: one model on the three partially labelled datasets, from {stage1}", flush=True)
    report("stage 2 finetune", _stage2(configs, data, stage2, stage1, cache, seed, budget))

    test = data / "nnUNet_raw" / _TEST_DATASET
    print(f"[4/6] evaluate: the stage 2 model on the fully labelled test set {test}", flush=True)
    line, evaluation = _evaluate(stage2, test, stage2 / "eval_test")
    report("evaluate", line)

    print("[5/6] predict: one test scan with `mosmos predict`", flush=True)
    line, scan, label_map = _predict(stage2, test, runs / "predict")
    report("predict", line)
    overlay = prediction_overlay(
        scan, test, runs / "predict", label_map, out / "summary_files" / "prediction.png"
    )

    print("[6/6] benchmark: random initialisation vs the stage 1 encoder, fine-tuned on KidneyB", flush=True)
    bench = runs / "benchmark"
    _benchmark(configs, data, bench, stage1, cache, seed, budget)
    line, _ = _benchmark_line(bench)
    report("benchmark", line)

    summary = write_summary(out, budget, lines, evaluation, stage1, bench, overlay, time.time() - t0)
    print(f"\ndemo finished in {_seconds(t0)}. The summary: {summary}")
    return 0
