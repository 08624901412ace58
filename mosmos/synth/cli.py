"""``mosmos synth``: write the synthetic data set (phantoms, reports, partially labelled datasets)."""

from __future__ import annotations

import argparse
import os

from mosmos.synth import DEFAULT_SHAPE, synthesize

_SHAPE = " ".join(str(v) for v in DEFAULT_SHAPE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mosmos synth`` (the lead's CLI adds them to its ``synth`` subcommand)."""
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory (new, empty, or an earlier synth output)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="master random seed (default: 0)")
    parser.add_argument(
        "--pretrain-cases",
        type=int,
        default=600,
        metavar="N",
        help="image-report pairs for pretraining (default: 600)",
    )
    parser.add_argument(
        "--seg-cases",
        type=int,
        default=20,
        metavar="N",
        help="cases in each of the 3 partially labelled segmentation datasets (default: 20)",
    )
    parser.add_argument(
        "--test-cases",
        type=int,
        default=12,
        metavar="N",
        help="cases in the fully labelled test dataset (default: 12)",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=list(DEFAULT_SHAPE),
        metavar=("X", "Y", "Z"),
        help=f"voxels per volume; spacing adapts (at most 10 mm) so the abdomen fits (default: {_SHAPE})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="processes making the pretraining cases; the output is the same for any N (default: all CPUs)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Generate the data set and print what was made and where; returns the exit code."""
    summary = synthesize(
        args.out,
        seed=args.seed,
        pretrain_cases=args.pretrain_cases,
        seg_cases=args.seg_cases,
        test_cases=args.test_cases,
        shape=tuple(args.shape),
        progress=not args.quiet,
        workers=args.workers,
    )
    counts, root, paths = summary["counts"], summary["out_dir"], summary["paths"]
    print(
        f"mosmos synth: wrote {root} in {summary['seconds']:.1f} s (seed {summary['seed']}, shape {summary['shape']})"
    )
    print(f"  pretrain: {counts['pretrain']} scans + reports in {root}/{paths['reports']}")
    print(f"  ground truth (keep out of training): {root}/{paths['findings']}")
    for folder, labels in summary["datasets"].items():
        n = counts["seg"].get(folder, counts["test"])
        names = ", ".join(k for k in labels if k != "background")
        print(f"  {root}/{paths['datasets'][folder]}: {n} cases labelling {names}")
    print(f"  phantom organs: {', '.join(summary['organs'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m mosmos.synth.cli``); ``mosmos synth`` is the usual way in."""
    parser = argparse.ArgumentParser(prog="mosmos synth", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
