"""Peak memory of a stage 1 epoch at N and 4N cases: nothing may grow with the dataset.

Runs the real stage 1 command (``python -m mosmos.pretrain``, ``configs/pretrain/demo.yaml``)
for exactly one epoch (and the final evaluation and checkpoint it ends with) on ``mosmos synth``
data of N and of 4N image-report pairs, each in a fresh process, and compares their peak resident
memory. The preprocessing cache is filled first by ``mosmos preprocess`` with the same overrides,
so the measured run reads a warm cache, as every epoch after a run's first does. ``quick`` shrinks
the model and the volumes to the test suite's tiny settings (N = 32); otherwise the demo's model
and volumes (N = 64). Only the command line is relied on, not stage 1's internals.

The peak is the larger of two readings: the command's process tree's summed PSS (proportional set
size: a page shared by forked data-loader workers counts once, not once per worker as summed RSS
would count it), polled every 50 ms; and ``ru_maxrss``, the largest single process's peak RSS, read
by a wrapper process that runs the command and exits (``RUSAGE_CHILDREN`` covers only processes it
waited for, so each measurement needs a fresh wrapper).

    python benchmarks/memory.py [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, format_rows, row, synth

MIB = 2**20
# runs the command given as its arguments, then prints the peak RSS (KiB) of the largest process
# it waited for; a fresh process per measurement, so no earlier run's peak is counted
_WRAPPER = (
    "import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print(json.dumps({'ru_maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), "
    "file=sys.stderr); sys.exit(rc)"
)
# the test suite's seconds-long stage 1 (tests/conftest.py: tiny_pretrain_overrides)
TINY = {
    "data.size": "[32, 32, 16]",
    "data.spacing": "[10.0, 10.0, 14.0]",
    "model.encoder_kwargs": "{channels: [8, 16, 16, 16], strides: [2, 2, 2, 2], num_res_units: 1, norm: batch}",
    "model.text_kwargs": "{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}",
    "model.tokenizer_vocab_size": "200",
    "model.embed_dim": "16",
    "model.tag_head.dim": "16",
}


def _resident(p: psutil.Process) -> int:
    """PSS of a process where the system reports it (Linux), else RSS."""
    try:
        return p.memory_full_info().pss
    except (AttributeError, psutil.AccessDenied):
        return p.memory_info().rss


def peak_rss(cmd: list[str], log: Path, env: dict[str, str] | None = None, poll_s: float = 0.05) -> int:
    """Peak resident memory (bytes) of ``cmd`` and its children (see the module docstring); its
    output goes to ``log``.

    Raises:
        RuntimeError: the command failed (the end of its log is in the message).
    """
    with open(log, "w") as out:
        wrapper = psutil.Popen(
            [sys.executable, "-c", _WRAPPER, *cmd], stdout=out, stderr=subprocess.STDOUT, env=env
        )
        polled = 0
        while wrapper.poll() is None:
            total = 0
            try:
                for p in wrapper.children(recursive=True):
                    total += _resident(p)
            except psutil.Error:  # a child ended between the listing and the reading
                pass
            polled = max(polled, total)
            time.sleep(poll_s)
    text = log.read_text(errors="replace")
    if wrapper.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {wrapper.returncode}):\n{text[-3000:]}")
    last = text.strip().splitlines()[-1]
    return max(polled, json.loads(last)["ru_maxrss_kib"] * 1024)


def stage1_overrides(data: Path, work: Path, quick: bool) -> list[str]:
    """Overrides of ``configs/pretrain/demo.yaml`` for one epoch on ``data`` (a ``mosmos synth`` output)."""
    pre = data / "pretrain"
    values = {
        "data.table": str(pre / "reports.csv"),
        "data.image_root": str(pre / "images"),
        "data.ground_truth": str(pre / "ground_truth"),
        "data.cache_dir": str(work / "cache"),
        "train.epochs": "1",
        "train.eval_every": "1000",  # no evaluation but the final one
        "train.batch_size": "4" if quick else "8",
        "eval.attention_overlays": "0",
        **(TINY if quick else {}),
    }
    return [f"{k}={v}" for k, v in values.items()]


def epoch_peak(cases: int, work: Path, quick: bool, device: str) -> int:
    """Peak RSS (bytes) of one stage 1 epoch on ``cases`` generated pairs, its cache filled first."""
    data = synth(work / "data", pretrain_cases=cases, workers=2)
    overrides = stage1_overrides(data, work, quick)
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU machine runs the CPU measurement on its CPU
    config = str(REPO / "configs/pretrain/demo.yaml")
    fill = [sys.executable, "-m", "mosmos", "preprocess", "--config", config, "--workers", "2"]
    with open(work / "preprocess.log", "w") as log:
        subprocess.run(
            [*fill, f"output_dir={work / 'run'}", *overrides],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            check=True,
        )
    cmd = [sys.executable, "-m", "mosmos.pretrain", "--config", config, f"output_dir={work / 'run'}"]
    return peak_rss([*cmd, *overrides], work / "pretrain.log", env)


def _demo_size() -> list[int]:
    from mosmos.config import load_config
    from mosmos.pretrain.config import PretrainConfig

    return list(load_config(PretrainConfig, REPO / "configs/pretrain/demo.yaml", []).data.size)


def measure(quick: bool, device: str, stage: str) -> list[dict]:
    """Rows for stage 1 (none for ``stage == "2"``)."""
    if stage == "2":
        return []
    n = 32 if quick else 64
    with tempfile.TemporaryDirectory() as tmp:
        small, large = (epoch_peak(cases, Path(tmp) / str(cases), quick, device) for cases in (n, 4 * n))
    size = json.loads(TINY["data.size"]) if quick else _demo_size()
    volume = math.prod(size) * 4 / MIB  # one preprocessed float32 image at data.size
    settings = "tiny model and volumes (the tests')" if quick else "the demo's model and volumes"
    return [
        row(
            "memory/stage1_epoch_peak_rss",
            large / MIB,
            "MiB",
            small / MIB,
            f"the same at {n} cases",
            goal="<= 1.2x",
            note=f"one epoch + final evaluation at {4 * n} cases, warm cache; {settings}",
        ),
        row(
            "memory/stage1_rss_per_case",
            (large - small) / MIB / (3 * n),
            "MiB/case",
            volume,
            f"one preprocessed volume ({'x'.join(map(str, size))} float32)",
            note="peak growth per added case, x 50,000 (CT-RATE) for what a real run would add; well "
            "below 1x: the volumes are not held in memory (near 0 or negative: within the noise)",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(format_rows(measure(args.quick, args.device, "1")))


if __name__ == "__main__":
    main()
