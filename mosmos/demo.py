"""``make demo``: the pipeline on generated data, on CPU, stage by stage.

synth -> stage 1 pretraining. (Stage 2 fine-tuning and the benchmark join as they land; the demo
says what it skipped.)
"""

from __future__ import annotations

import time
from pathlib import Path


def run_demo(out: Path, seed: int = 0, configs: Path | None = None) -> int:
    from mosmos.config import load_config
    from mosmos.synth import synthesize
    from pretrain.config import PretrainConfig
    from pretrain.train import run as run_pretrain

    configs = configs or Path(__file__).resolve().parent.parent / "configs"
    out = Path(out)
    data = out / "data"
    t0 = time.time()
    print(f"[1/2] synth: generating phantoms, reports and partially labelled datasets in {data}")
    if (data / "synth.json").is_file():
        print("      (already there; delete the folder to regenerate)")
    else:
        synthesize(data, seed=seed)
    print(f"[2/2] pretrain: stage 1 on {data / 'pretrain' / 'reports.csv'}")
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
    run_pretrain(cfg)
    print(f"\ndemo finished in {time.time() - t0:.0f}s. What it made:")
    print(f"  {data}/pretrain          CT volumes + reports.csv (CT-RATE columns)")
    print(f"  {data}/nnUNet_raw        partially labelled datasets + a fully labelled test set")
    print(f"  {out}/pretrain/metrics.json       stage 1 validation metrics per epoch")
    print(f"  {out}/pretrain/encoder.safetensors the pretrained encoder (+ encoder.json)")
    print(f"  {out}/pretrain/attention/         pixel-tag attention overlays")
    print("Not yet in the demo: stage 2 fine-tuning and the initialisation benchmark (not implemented yet).")
    return 0
