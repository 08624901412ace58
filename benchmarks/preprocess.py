"""Preprocessing throughput: ``mosmos preprocess`` filling a stage 1 cache with one worker and with
every CPU, each into a fresh cache directory, on the same generated volumes.

    python benchmarks/preprocess.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, format_rows, row, synth


def measure(quick: bool, device: str, stage: str, work: Path | None = None) -> list[dict]:
    from mosmos.cli.preprocess import default_workers, fill_cache
    from mosmos.config import load_config
    from mosmos.pretrain.config import PretrainConfig

    if stage == "2":
        return []
    with tempfile.TemporaryDirectory(prefix="mosmos-bench-pre-") as tmp:
        work = Path(work or tmp)
        data = work / "data"
        if not (data / "synth.json").is_file():
            synth(data, pretrain_cases=48 if quick else 600, workers=2)
        pretrain = data / "pretrain"
        rates = {}
        everyone = max(1, default_workers())
        for workers in (1, everyone):
            cfg = load_config(
                PretrainConfig,
                REPO / "configs/pretrain/demo.yaml",
                [
                    f"output_dir={work / f'run{workers}'}",
                    f"data.table={pretrain / 'reports.csv'}",
                    f"data.image_root={pretrain / 'images'}",
                    "data.ground_truth=null",
                    f"data.cache_dir={work / f'cache_w{workers}'}",
                    "data.check=none",
                ],
            )
            result = fill_cache(cfg, workers=workers, rank=0, world=1, progress=False)
            rates[workers] = result["volumes_per_s"]
            n = result["total"]
    return [
        row(
            "preprocess/volumes_per_s",
            rates[everyone],
            "volumes/s",
            rates[1],
            "one worker",
            goal=f">= {min(everyone, 2) * 0.6:.1f}x" if everyone > 1 else None,
            note=f"{n} stage 1 volumes (demo config) with {everyone} workers vs 1, fresh caches",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(format_rows(measure(args.quick, "cpu", "1")))


if __name__ == "__main__":
    main()
