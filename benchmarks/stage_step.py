"""A stage's training step through the engine against a bare PyTorch loop, the data-wait share, the
achieved FLOP/s, and an epoch read from the preprocessing cache against one preprocessing again.

Each stage runs its demo config (configs/pretrain/demo.yaml, configs/finetune/demo.yaml) on
generated data, on the device asked for, with the engine's defaults (``train.num_workers: auto``,
``train.channels_last: auto``):

- engine: ``Engine.fit`` for warm-up + timed steps, each batch's wait for the loader and its step
  timed inside the loop (the final evaluation and checkpoint are left out);
- bare loop: the same task's model, dataset, collation, worker count and step function in
  ``for batch in loader: loss.backward(); opt.step(); opt.zero_grad()`` with plain AdamW;
- FLOPs of one step (forward + backward) counted by ``torch.utils.flop_counter``;
- cache: every training case read once from the filled cache vs preprocessed from its NIfTI file.

    python benchmarks/stage_step.py [--quick] [--stage 1|2|all] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, format_rows, row, synth
from roofline import count_flops, gflops_per_s

from mosmos.engine import Engine


class _TimedEngine(Engine):
    """The engine, recording each batch's (data wait, step) seconds and skipping the final
    evaluation and checkpoint (not part of a step)."""

    def _time(self, data_s: float, step_s: float) -> None:
        super()._time(data_s, step_s)
        self.batch_times = [*getattr(self, "batch_times", []), (data_s, step_s)]

    def _finish(self, start: float) -> None:
        pass


def _stage_config(stage: str, data: Path, work: Path, steps: int, extra: list[str]) -> Any:
    from mosmos.config import load_config

    common = [
        f"output_dir={work / f'run{stage}'}",
        f"data.cache_dir={work / 'cache'}",
        f"train.max_steps={steps}",
        "train.eval_every=1000000",
        "train.checkpoint_every=1000000",
        "data.check=none",
        "train.overwrite=true",  # a reused --work folder: time a fresh run, never resume a finished one
        *extra,
    ]
    if stage == "1":
        from mosmos.pretrain.config import PretrainConfig

        p = data / "pretrain"
        over = [
            f"data.table={p / 'reports.csv'}",
            f"data.image_root={p / 'images'}",
            "data.ground_truth=null",
            *common,
        ]
        return load_config(PretrainConfig, REPO / "configs/pretrain/demo.yaml", over)
    from mosmos.finetune.config import FinetuneConfig

    raw = data / "nnUNet_raw"
    sets = sorted(str(d) for d in raw.iterdir() if d.name != "Dataset099_SynthTest")
    over = ["data.datasets=[" + ",".join(sets) + "]", *common]
    return load_config(FinetuneConfig, REPO / "configs/finetune/demo.yaml", over)


def _task(stage: str, cfg: Any, accelerator: Any) -> Any:
    if stage == "1":
        from mosmos.pretrain.train import PretrainTask

        return PretrainTask(cfg, accelerator)
    from mosmos.finetune.train import FinetuneTask

    return FinetuneTask(cfg, accelerator)


def _bare_loop(engine: _TimedEngine, steps: int) -> list[float]:
    """Seconds per step (loader wait included) of a plain loop over the engine task's data and model."""
    from accelerate.utils import send_to_device

    from mosmos.engine.sampler import make_train_loader

    task, device = engine.task, engine.accelerator.device
    model = engine.accelerator.unwrap_model(engine.model)
    opt = torch.optim.AdamW(model.parameters(), lr=engine.cfg.lr)
    loader = make_train_loader(
        task.train_dataset, engine.cfg.batch_size, task.collate_fn, engine.num_workers, engine.seed
    )
    times: list[float] = []
    while len(times) < steps:
        batches = iter(loader)
        while len(times) < steps:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            loss = task.step(model, send_to_device(batch, device))["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times


def _cache_epoch(stage: str, engine: _TimedEngine, limit: int) -> tuple[float, float, int]:
    """Seconds to read ``limit`` training cases from the cache, and to preprocess them again."""
    from monai.data import Dataset

    task = engine.task
    cached = task.train_dataset.cached_volumes if stage == "1" else task.train_dataset.cached
    n = min(limit, len(cached))
    for i in range(n):  # fill (the first epoch)
        cached[i]
    start = time.perf_counter()
    for i in range(n):
        cached[i]
    warm = time.perf_counter() - start
    uncached = Dataset(data=list(cached.data)[:n], transform=cached.transform)
    start = time.perf_counter()
    for i in range(n):
        uncached[i]
    return warm, time.perf_counter() - start, n


def measure_stage(stage: str, quick: bool, device: str, work: Path, extra: list[str] = ()) -> list[dict]:
    from mosmos.engine import start_run

    data = work / "data"
    if not (data / "synth.json").is_file():
        # quick: 160 pairs, 8 batches an epoch (with fewer, the worker start of every epoch dominates)
        synth(data, pretrain_cases=160 if quick else 600, seg_cases=4 if quick else 20, workers=2)
    warm, timed = (3, 8) if quick else (5, 30)
    cfg = _stage_config(stage, data, work, warm + timed, list(extra))
    if device == "cpu":  # accelerate reads it when it builds the Accelerator
        os.environ["ACCELERATE_USE_CPU"] = "true"
    accelerator = start_run(cfg, cfg.train)
    engine = _TimedEngine(_task(stage, cfg, accelerator), cfg.train, cfg.output_dir, cfg.seed, accelerator)
    engine.fit()
    steady = engine.batch_times[warm:]
    engine_s = statistics.median(d + s for d, s in steady)
    wait = sum(d for d, _ in steady) / sum(d + s for d, s in steady)
    bare_s = statistics.median(_bare_loop(engine, warm + timed)[warm:])

    task = engine.task
    model = accelerator.unwrap_model(engine.model)
    items = [task.train_dataset[i] for i in range(cfg.train.batch_size)]
    from accelerate.utils import send_to_device

    collate = task.collate_fn or default_collate
    batch = send_to_device(collate(items), accelerator.device)
    flops = count_flops(lambda: task.step(model, batch)["loss"].backward())
    model.zero_grad(set_to_none=True)
    cache_s, fresh_s, n = _cache_epoch(stage, engine, 16 if quick else 64)

    what = "stage 1 demo config" if stage == "1" else "stage 2 demo config"
    layout = "channels-last" if engine.channels_last else "default layout"
    detail = f"{what}, batch {cfg.train.batch_size}, {engine.num_workers} worker(s), {layout}"
    return [
        row(
            f"stage{stage}/engine_step",
            engine_s,
            "s",
            bare_s,
            "bare PyTorch loop",
            goal="<= 1.05x",
            note=f"median of {timed} steps after {warm}; {detail}",
        ),
        row(
            f"stage{stage}/data_wait_share",
            wait,
            "share",
            goal="< 0.05",
            note=f"loader wait / wall time of the engine's timed steps; {detail}",
        ),
        row(
            f"stage{stage}/achieved",
            gflops_per_s(flops, bare_s),
            "GFLOP/s",
            note=f"{flops / 1e9:.1f} GFLOP per step (forward + backward) over the bare step time",
        ),
        row(
            f"stage{stage}/cache_epoch",
            cache_s,
            "s",
            fresh_s,
            "preprocessing from NIfTI",
            inverse=True,
            goal=">= 5x",
            note=f"{n} training cases read from the filled cache vs preprocessed again",
        ),
    ]


def measure(
    quick: bool, device: str, stage: str, work: Path | None = None, extra: list[str] = ()
) -> list[dict]:
    stages = ["1", "2"] if stage == "all" else [stage]
    with tempfile.TemporaryDirectory(prefix="mosmos-bench-") as tmp:
        work = Path(work or tmp)
        return [r for s in stages for r in measure_stage(s, quick, device, work, extra)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stage", choices=("1", "2", "all"), default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, help="keep generated data and caches here (default: a temp dir)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. train.num_workers=0")
    args = parser.parse_args()
    print(format_rows(measure(args.quick, args.device, args.stage, args.work, args.set)))


if __name__ == "__main__":
    main()
