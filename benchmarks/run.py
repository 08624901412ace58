"""How fast mosmos runs here, every figure a ratio to a baseline measured in the same run.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--stage 1|2|all] [--only MODULE ...]

Prints one table and writes ``benchmarks/results/<machine>-<date>.json`` (rows, machine, versions).
The modules, each also runnable on its own:

- roofline: the machine's attainable rate for this workload (a large matmul, a large 3D
  convolution, in float32 and in bf16 where it is native);
- stage_step: each stage's training step through the engine vs a bare PyTorch loop, the share of
  step time spent waiting for data, the achieved FLOP/s (and here, its share of the conv3d peak),
  an epoch from the preprocessing cache vs preprocessing again;
- memory: peak RSS of a stage 1 epoch at N and 4N cases;
- inference: sliding-window prediction of whole volumes vs ``monai.inferers.sliding_window_inference``
  with its defaults, at equal Dice;
- preprocess: ``mosmos preprocess`` volumes/s with one worker and with every CPU.

A goal a figure misses is printed as ``NO``; the table says which, the notes say why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference
import memory
import preprocess
import roofline
import stage_step
from common import format_rows, row

MODULES = {
    "roofline": roofline,
    "stage_step": stage_step,
    "memory": memory,
    "inference": inference,
    "preprocess": preprocess,
}
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    from mosmos.engine.precision import cpu_has_native_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "hostname": platform.node(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _peak_shares(rows: list[dict]) -> list[dict]:
    """Each stage's achieved FLOP/s as a share of the conv3d peak measured in the same run."""
    peak = next((r for r in rows if r["name"] == "roofline/conv3d_fp32"), None)
    out = []
    for r in rows:
        if peak is not None and r["name"].endswith("/achieved"):
            stage = r["name"].split("/")[0]
            out.append(
                row(
                    f"{stage}/share_of_peak",
                    r["value"],
                    "GFLOP/s",
                    peak["value"],
                    "conv3d fp32 peak",
                    note="achieved training FLOP/s over the large-convolution rate",
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: under 10 minutes on 2 CPU cores")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--stage", default="all", choices=("1", "2", "all"))
    parser.add_argument("--only", nargs="*", choices=sorted(MODULES), help="run only these modules")
    parser.add_argument(
        "--out", type=Path, help="JSON file (default: benchmarks/results/<machine>-<date>.json)"
    )
    args = parser.parse_args(argv)
    start = time.time()
    rows: list[dict] = []
    for name, module in MODULES.items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        print(f"[{name}] ...", flush=True)
        rows += module.measure(args.quick, args.device, args.stage)
        print(f"[{name}] {time.time() - t0:.0f} s", flush=True)
    rows += _peak_shares(rows)
    info = machine()
    print()
    print(
        f"{info['cpu']}, {info['cpus']} CPUs ({info['cpu_capability']}), {args.device}, torch {info['torch']}"
    )
    print(format_rows(rows))
    missed = [r["name"] for r in rows if r["met"] is False]
    print(f"\ngoals missed: {', '.join(missed) if missed else 'none'}; {time.time() - start:.0f} s in all")
    out = (
        args.out
        or RESULTS / f"{_slug(info)}-{dt.date.today().isoformat()}{'-quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": info,
        "args": vars(args) | {"out": str(out)},
        "rows": rows,
        "seconds": time.time() - start,
    }
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _slug(info: dict) -> str:
    name = info.get("gpu") or info["cpu"]
    text = f"{name}-{info['cpus']}cpu-{info['cpu_capability']}".lower()
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


if __name__ == "__main__":
    raise SystemExit(main())
