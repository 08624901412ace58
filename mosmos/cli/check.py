"""``mosmos check PATH ...`` / ``mosmos check --config FILE``: every problem of the inputs, before training.

A PATH is a report table (.csv/.tsv/.jsonl/.json list/.parquet) or a segmentation dataset (nnU-Net
v2 / MSD folder, dataset.json or datalist .json). With ``--config`` the table or datasets a
pretrain / finetune config names are checked with that config's columns, label maps and
vocabulary. Exit status: 0 when no errors were found (warnings allowed), 1 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from mosmos.check.cases import CheckCache
from mosmos.check.datasets import check_seg_dataset
from mosmos.check.report import CheckReport, problems_csv
from mosmos.check.tables import check_report_table, is_report_table
from mosmos.errors import ConfigError
from mosmos.io import atomic_write_text
from mosmos.pretrain.tags_cli import add_table_column_arguments
from mosmos.segdata.dataset import seg_dataset_name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="report tables and/or segmentation datasets (nnU-Net v2 / MSD folders, dataset.json, datalists)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="check what a pretrain or finetune config reads (its table or datasets)",
    )
    add_table_column_arguments(p)
    p.add_argument(
        "--image-root", default=None, help="tables: folder image paths are relative to (default: the table's)"
    )
    p.add_argument(
        "--vocabulary",
        default=None,
        help="organ vocabulary YAML for dataset labels (default: configs/organs.yaml)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="headers only: skip reading voxels (no NaN, label-value or truncation checks)",
    )
    p.add_argument("--workers", type=int, default=2, help="threads reading volumes (default: 2)")
    p.add_argument("--csv", metavar="FILE", help="also write every problem to this CSV file")
    p.add_argument(
        "--max-shown",
        type=int,
        default=50,
        help="problems printed per table or dataset (default: 50; 0: all)",
    )
    p.add_argument("--strict", action="store_true", help="exit with status 1 on warnings too")


def _config_targets(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(kind, options) for each input a pretrain or finetune config reads."""
    from mosmos.config import load_config

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config: {e}") from None
    data = raw.get("data", {}) if isinstance(raw, dict) else {}
    if isinstance(data, dict) and "table" in data:
        from mosmos.pretrain.config import PretrainConfig

        cfg = load_config(PretrainConfig, path)
        d = cfg.data
        return [
            (
                "table",
                {
                    "path": d.table,
                    "image_column": d.image_column,
                    "report_columns": d.report_columns,
                    "image_root": d.image_root,
                },
            )
        ]
    if isinstance(data, dict) and "datasets" in data:
        from mosmos.finetune.config import FinetuneConfig

        cfg = load_config(FinetuneConfig, path)
        out = []
        for ds in cfg.data.datasets:
            try:
                name = seg_dataset_name(ds)
            except Exception:  # reported by the dataset check itself
                name = ""
            out.append(
                (
                    "dataset",
                    {
                        "path": ds,
                        "vocabulary": cfg.data.vocabulary,
                        "label_map": cfg.data.label_map.get(name),
                        "ignore": cfg.data.ignore_labels.get(name),
                        "labels": cfg.data.labels.get(name),
                    },
                )
            )
        return out
    raise ConfigError(
        f"{path}: not a pretrain config (data.table) or a finetune config (data.datasets); "
        "give the table or dataset paths instead"
    )


def run(args: argparse.Namespace) -> int:
    from mosmos.vocabulary import load_vocabulary

    targets: list[tuple[str, dict[str, Any]]] = []
    if args.config:
        targets += _config_targets(args.config)
    for path in args.paths:
        if is_report_table(path):
            targets.append(
                (
                    "table",
                    {
                        "path": path,
                        "image_column": args.image_column,
                        "report_columns": args.report_columns,
                        "image_root": args.image_root,
                    },
                )
            )
        else:
            targets.append(("dataset", {"path": path, "vocabulary": args.vocabulary}))
    if not targets:
        raise ConfigError("nothing to check: give one or more PATHs or --config FILE")

    cache = CheckCache(None)
    deep = not args.quick
    reports: list[CheckReport] = []
    vocabularies: dict[str | None, Any] = {}
    for kind, opt in targets:
        if kind == "table":
            report, _ = check_report_table(
                opt["path"],
                opt["image_column"],
                opt["report_columns"],
                opt["image_root"],
                deep=deep,
                workers=args.workers,
                cache=cache,
                progress=True,
            )
        else:
            voc_path = opt.get("vocabulary")
            if voc_path not in vocabularies:
                vocabularies[voc_path] = load_vocabulary(voc_path)
            report = check_seg_dataset(
                opt["path"],
                vocabularies[voc_path],
                opt.get("label_map"),
                opt.get("ignore"),
                opt.get("labels"),
                deep=deep,
                workers=args.workers,
                cache=cache,
                progress=True,
            )
        reports.append(report)
        print(report.format(args.max_shown or None))
    if args.csv:
        parts = [problems_csv(r.problems, {"target": r.target}) for r in reports]
        atomic_write_text(args.csv, parts[0] + "".join(p.split("\n", 1)[1] for p in parts[1:]))
        print(f"problems written to {args.csv}")
    n_err = sum(len(r.errors) for r in reports)
    n_warn = sum(len(r.warnings) for r in reports)
    verdict = "OK" if n_err == 0 else "FAILED"
    print(f"{verdict}: {n_err} error(s), {n_warn} warning(s) in {len(reports)} input(s)")
    return 1 if n_err or (args.strict and n_warn) else 0
