"""How much the on-disk preprocessing cache saves per epoch (stage 1 and 2 share it).

Generates a small synthetic set, then times one pass over it through the MONAI chain without a
cache (the baseline), the first cached pass (which fills the cache) and a second cached pass, and
prints each as a ratio to the baseline.

    python benchmarks/bench_preprocess_cache.py [--cases 40] [--shape 64 64 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mosmos.cache import cache_key, cached_dataset
from mosmos.synth import synthesize
from mosmos.transforms import PreprocessConfig, build_preprocess


def _epoch(dataset) -> float:
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 40])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(
            root / "data",
            seed=0,
            pretrain_cases=args.cases,
            seg_cases=1,
            test_cases=1,
            shape=tuple(args.shape),
            progress=False,
        )
        items = [{"image": str(p)} for p in sorted((root / "data/pretrain/images").glob("*.nii.gz"))]
        cfg = PreprocessConfig(spacing=(6.0, 6.0, 8.0), size=(64, 64, 32))
        transform = build_preprocess(cfg)
        baseline = _epoch(cached_dataset(items, transform, None, cache_key(cfg)))
        fill = _epoch(cached_dataset(items, transform, root / "cache", cache_key(cfg)))
        warm = _epoch(cached_dataset(items, transform, root / "cache", cache_key(cfg)))
    print(f"{len(items)} volumes {tuple(args.shape)} -> {cfg.size}")
    print(f"{'pass':<28}{'seconds':>10}{'ratio to no cache':>20}")
    for name, t in (
        ("no cache (baseline)", baseline),
        ("cached, first pass", fill),
        ("cached, later passes", warm),
    ):
        print(f"{name:<28}{t:>10.2f}{t / baseline:>20.2f}")


if __name__ == "__main__":
    main()
