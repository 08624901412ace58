"""``make demo``: the pipeline on generated data, on CPU, stage by stage.

synth -> stage 1 pretraining -> stage 2 fine-tuning on three partially labelled datasets ->
evaluation on the fully labelled generated test set -> the initialisation benchmark
(configs/benchmark/demo.yaml). Every stage resumes: rerunning the demo skips finished work.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mosmos.resources import configs_dir

_SEG_DATASETS = ("Dataset011_AbdomenA", "Dataset012_KidneyB", "Dataset013_VesselsC")
_TEST_DATASET = "Dataset099_SynthTest"


def run_demo(out: Path, seed: int = 0, configs: Path | None = None) -> int:
    from mosmos.benchmark.config import BenchmarkConfig
    from mosmos.benchmark.run import run_benchmark
    from mosmos.config import load_config
    from mosmos.finetune.config import FinetuneConfig
    from mosmos.finetune.evaluate import evaluate_run
    from mosmos.finetune.train import run as run_finetune
    from mosmos.pretrain.config import PretrainConfig
    from mosmos.pretrain.train import run as run_pretrain
    from mosmos.synth import synthesize

    configs = configs or configs_dir()
    out = Path(out)
    data = out / "data"
    t0 = time.time()
    print(f"[1/5] synth: generating phantoms, reports and partially labelled datasets in {data}")
    if (data / "synth.json").is_file():
        print("      (already there; delete the folder to regenerate)")
    else:
        synthesize(data, seed=seed, workers=os.cpu_count() or 1)
    print(f"[2/5] pretrain: stage 1 on {data / 'pretrain' / 'reports.csv'}")
    cfg = load_config(
        PretrainConfig,
        configs / "pretrain" / "demo.yaml",
        [
            f"output_dir={out / 'pretrain'}",
            f"seed={seed}",
            f"data.table={data / 'pretrain' / 'reports.csv'}",
            f"data.image_root={data / 'pretrain' / 'images'}",
            f"data.ground_truth={data / 'pretrain' / 'ground_truth'}",
            f"data.cache_dir={out / 'cache'}",
            "train.resume=latest",
        ],
    )
    if (out / "pretrain" / "encoder.safetensors").is_file():
        print("      (already trained; delete the folder to retrain)")
    else:
        run_pretrain(cfg)
    nnunet = data / "nnUNet_raw"
    # From random initialisation: on the demo's budget the stage 1 encoder did not help (see README);
    # the benchmark below compares initialisations under one protocol.
    print(f"[3/5] finetune: stage 2 on {nnunet}/Dataset011..013 (partial labels, one model)")
    ft = load_config(
        FinetuneConfig,
        configs / "finetune" / "demo.yaml",
        [
            f"output_dir={out / 'finetune'}",
            f"seed={seed}",
            "data.datasets=[" + ",".join(str(nnunet / d) for d in _SEG_DATASETS) + "]",
            f"data.cache_dir={out / 'cache'}",
            "train.resume=latest",
        ],
    )
    run_finetune(ft)
    print(f"[4/5] evaluate: the stage 2 model on the fully labelled test set {nnunet / _TEST_DATASET}")
    evaluate_run(out / "finetune", nnunet / _TEST_DATASET, out / "finetune" / "eval_test")
    print("[5/5] benchmark: initialisation strategies x label fractions x seeds on KidneyB")
    bench = load_config(
        BenchmarkConfig,
        configs / "benchmark" / "demo.yaml",
        [
            f"output_dir={out / 'benchmark'}",
            f"seed={seed}",
            f"data.target={nnunet / 'Dataset012_KidneyB'}",
            f"data.test={nnunet / _TEST_DATASET}",
            f"data.pretrain_table={data / 'pretrain' / 'reports.csv'}",
            f"data.pretrain_image_root={data / 'pretrain' / 'images'}",
            f"data.pretrain_ground_truth={data / 'pretrain' / 'ground_truth'}",
            "data.other_datasets=["
            + ",".join(str(nnunet / d) for d in ("Dataset011_AbdomenA", "Dataset013_VesselsC"))
            + "]",
            f"data.cache_dir={out / 'cache'}",
        ],
    )
    summary = run_benchmark(bench)
    print(f"\ndemo finished in {time.time() - t0:.0f}s. What it made:")
    print(f"  {data}/pretrain          CT volumes + reports.csv (CT-RATE columns)")
    print(f"  {data}/nnUNet_raw        partially labelled datasets + a fully labelled test set")
    print(f"  {out}/pretrain/metrics.json       stage 1 validation metrics per epoch")
    print(f"  {out}/pretrain/encoder.safetensors the pretrained encoder (+ encoder.json)")
    print(f"  {out}/pretrain/attention/         pixel-tag attention overlays")
    print(f"  {out}/finetune/model.safetensors  the stage 2 segmenter (+ model.json, metrics.json)")
    print(f"  {out}/finetune/eval_test/         test-set Dice / HD95 per organ (metrics.json, cases.csv)")
    print(f"  {out}/benchmark/                 results.csv, cases.csv, plots, summary.md")
    print(f"\nThe benchmark report: {summary}")
    return 0
