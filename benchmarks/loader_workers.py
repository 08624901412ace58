"""Loader workers on a CPU-only machine: a stage's demo step with ``train.num_workers`` 0 against 1.

A loader worker prepares the next batch while the model computes, but on a machine with few cores
it is one more busy process beside the training process's compute threads, and an OpenMP region
waits for its slowest thread. Each side runs the stage's demo config through ``mosmos pretrain`` /
``mosmos finetune`` on the same generated data, for ``--short`` and ``--long`` optimizer steps; the
difference of the wall times over the difference in steps is the time per step with data loading,
augmentation and everything the loop does (start-up and the final evaluation cancel out). Sides
alternate so load drift hits both; each side's cache is filled first, untimed.

    python benchmarks/loader_workers.py [--stage 1|2|all] [--short 10 --long 60] [--rounds 2]
        [--data DIR] [--workers 0 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, synth, timed_command


def _overrides(stage: int, data: Path, out: Path, steps: int) -> list[str]:
    common = [
        f"output_dir={out}",
        f"data.cache_dir={out.parent / f'cache{stage}'}",
        f"train.max_steps={steps}",
        "train.checkpoint_every=100000",
        "train.eval_every=100000",
    ]
    if stage == 1:
        pairs = data / "pretrain"
        return [
            *common,
            f"data.table={pairs / 'reports.csv'}",
            f"data.image_root={pairs / 'images'}",
            f"data.ground_truth={pairs / 'ground_truth'}",
            "eval.attention_overlays=0",
        ]
    raw = data / "nnUNet_raw"
    datasets = ",".join(
        str(raw / d) for d in ("Dataset011_AbdomenA", "Dataset012_KidneyB", "Dataset013_VesselsC")
    )
    return [*common, f"data.datasets=[{datasets}]"]


def timed_run(stage: int, data: Path, out: Path, steps: int, workers: int) -> float:
    """Wall seconds of one demo run of ``steps`` optimizer steps with ``workers`` loader workers."""
    command = "pretrain" if stage == 1 else "finetune"
    config = REPO / "configs" / command / "demo.yaml"
    argv = [sys.executable, "-m", f"mosmos.{command}", "--config", str(config)]
    argv += [*_overrides(stage, data, out, steps), f"train.num_workers={workers}"]
    return timed_command(argv, out.parent, {**os.environ, "PYTHONWARNINGS": "ignore"}, f"stage {stage}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["1", "2", "all"], default="all")
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", nargs=2, type=int, default=[1, 0], help="baseline, then the other")
    parser.add_argument("--data", type=Path, help="a `mosmos synth` output (default: generate 600 pairs)")
    args = parser.parse_args()
    stages = [1, 2] if args.stage == "all" else [int(args.stage)]
    with tempfile.TemporaryDirectory(prefix="mosmos-workers-") as tmp:
        tmp = Path(tmp)
        data = args.data or synth(tmp / "data", pretrain_cases=600, workers=os.cpu_count() or 1)
        for stage in stages:
            per_step: dict[int, list[float]] = {w: [] for w in args.workers}
            timed_run(stage, data, tmp / f"warm{stage}", args.long, args.workers[0])  # fills the cache
            for r in range(args.rounds):
                for w in args.workers:
                    short = timed_run(stage, data, tmp / f"s{stage}-{r}-{w}", args.short, w)
                    long = timed_run(stage, data, tmp / f"l{stage}-{r}-{w}", args.long, w)
                    per_step[w].append((long - short) / (args.long - args.short))
                    print(f"stage {stage}, {w} worker(s): {per_step[w][-1]:.3f} s per step (round {r + 1})")
            base, other = (min(per_step[w]) for w in args.workers)
            print(
                f"stage {stage}: {args.workers[0]} worker(s) {base:.3f} s, {args.workers[1]} worker(s) "
                f"{other:.3f} s per step (best round): {base / other:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
