"""The ``mosmos`` command line: one verb per stage, each parsing and delegating.

A stage is imported only inside the subcommand that runs it, so ``mosmos synth`` never loads
the models and a missing optional piece cannot break unrelated verbs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mosmos import __version__
from mosmos.entry import setup_logging
from mosmos.errors import MosmosError


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="YAML config file, or a shipped config by name (pretrain/demo, finetune/default, ...)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 data.size=[64,64,32]")


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished run, or one of another config, in output_dir: its checkpoints, logs "
        "and exports are removed first (train.overwrite=true); refused when the folder holds other files",
    )


def _stage_argv(args) -> list[str]:
    return ["--config", args.config, *(["--overwrite"] if args.overwrite else []), *args.overrides]


def _synth(sub) -> None:
    from mosmos.synth import cli

    p = sub.add_parser(
        "synth", help="generate synthetic CT phantoms, reports and partially labelled datasets"
    )
    cli.add_arguments(p)
    p.set_defaults(func=cli.run)


def _tags(sub) -> None:
    from mosmos.pretrain import tags_cli  # light: the parser and table reader, no models

    p = sub.add_parser("tags", help="parse a report table into organ tags and print per-organ frequencies")
    tags_cli.add_arguments(p)
    p.set_defaults(func=tags_cli.run)


def _check(sub) -> None:
    from mosmos.cli import check as check_cli

    p = sub.add_parser(
        "check",
        help="find every problem in report tables and segmentation datasets before training",
        description=check_cli.__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check_cli.add_arguments(p)
    p.set_defaults(func=check_cli.run)


def _pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="stage 1: report-supervised pretraining (MOSMOS)")
    _add_run_arguments(p)
    _add_overwrite(p)

    def run(args):
        from mosmos.pretrain.train import main

        return main(_stage_argv(args))

    p.set_defaults(func=run)


def _finetune(sub) -> None:
    p = sub.add_parser("finetune", help="stage 2: multi-organ segmentation from partially labelled datasets")
    _add_run_arguments(p)
    _add_overwrite(p)

    def run(args):
        from mosmos.finetune.train import main

        return main(_stage_argv(args))

    p.set_defaults(func=run)


def _preprocess(sub) -> None:
    from mosmos.cli import preprocess as preprocess_cli  # light: the stages load inside the command

    p = sub.add_parser(
        "preprocess",
        help="fill a pretrain or finetune config's preprocessing cache: parallel, sharded, resumable",
        description=preprocess_cli.__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    preprocess_cli.add_arguments(p)
    p.set_defaults(func=preprocess_cli.run)


def _evaluate(sub) -> None:
    from mosmos.finetune import evaluate  # light at import: the models load inside the command

    p = sub.add_parser("evaluate", help="Dice and HD95 of a trained model on a labelled dataset")
    evaluate.add_arguments(p)
    p.set_defaults(func=lambda args: (evaluate.run_from_args(args), 0)[1])


def _predict(sub) -> None:
    from mosmos.finetune import predict

    p = sub.add_parser("predict", help="label maps for new volumes, in each input's own geometry")
    predict.add_arguments(p)
    p.set_defaults(func=lambda args: (predict.run_from_args(args), 0)[1])


def _benchmark(sub) -> None:
    p = sub.add_parser(
        "benchmark", help="initialisation strategy x label fraction x seed grid, with a report and tests"
    )
    _add_run_arguments(p)

    def run(args):
        from mosmos.benchmark.run import main

        return main(["--config", args.config, *args.overrides])

    p.set_defaults(func=run)


def _demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on generated data, on CPU (what `make demo` runs)")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--seed", type=int, default=0, help="seed for data and training (default: 0)")
    p.add_argument(
        "--full",
        action="store_true",
        help="the shipped demo configs as they are (an hour or more on 2 cores) instead of the "
        "ten-minute budget",
    )

    def run(args):
        from mosmos.cli.demo import run_demo

        return run_demo(Path(args.out), seed=args.seed, full=args.full)

    p.set_defaults(func=run)


def _export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a finished run as a self-contained folder (config.json + model.safetensors)",
        description="Write a stage 1 or stage 2 run as a folder that mosmos.from_pretrained(DIR) loads: "
        "config.json and model.safetensors (Hugging Face names), with stage 1's text tower in text/.",
    )
    p.add_argument("run", help="a finished stage 1 or stage 2 run directory")
    p.add_argument("-o", "--output", required=True, help="the export folder (created; must be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace --output when it is not empty")

    def run(args):
        from mosmos.api_export import export_run

        out = export_run(args.run, args.output, overwrite=args.overwrite)
        print(f"exported {args.run} to {out} (load it with mosmos.from_pretrained({str(out)!r}))")
        return 0

    p.set_defaults(func=run)


def _info(sub) -> None:
    p = sub.add_parser(
        "info", help="organs, tasks, preprocessing, objective and best scores of a run or an export"
    )
    p.add_argument("run", help="a stage 1 or stage 2 run directory, or a mosmos export")
    p.add_argument("--json", action="store_true", help="print the record as JSON")

    def run(args):
        import json

        from mosmos.api_info import format_info, run_info

        info = run_info(args.run)
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0

    p.set_defaults(func=run)


def _models(sub) -> None:
    p = sub.add_parser("models", help="list the registered image encoders and networks")

    def run(args):
        from mosmos.models.registry import list_models

        for name in list_models():
            print(name)
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mosmos",
        description="Report-supervised pretraining and multi-organ segmentation from partially labelled CT.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-V", "--version", action="version", version=f"mosmos {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (
        _synth,
        _check,
        _tags,
        _preprocess,
        _pretrain,
        _finetune,
        _evaluate,
        _predict,
        _export,
        _info,
        _benchmark,
        _models,
        _demo,
    ):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except MosmosError as exc:
        if args.verbose:
            raise
        print(f"mosmos {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mosmos {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
