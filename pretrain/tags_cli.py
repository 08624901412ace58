"""``mosmos tags TABLE``: parse a report table into organ tags and print how often each tag occurs.

Run it on a new corpus before training: an organ no report mentions, or whose tag is always the
same value, gives the pixel-tag attention nothing to learn from.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

from mosmos.errors import DataError
from mosmos.pretrain.tags import tag_frequencies, tag_matrix
from mosmos.table import read_report_table
from mosmos.vocabulary import Vocabulary, load_vocabulary


def add_table_column_arguments(parser: argparse.ArgumentParser) -> None:
    """``--image-column`` and ``--report-columns``, shared by the verbs that read a report table."""
    parser.add_argument(
        "--image-column", default="VolumeName", help="column naming each volume (default: VolumeName)"
    )
    parser.add_argument(
        "--report-columns",
        nargs="+",
        default=["Findings_EN", "Impressions_EN"],
        metavar="COLUMN",
        help="report text columns, joined in this order (default: Findings_EN Impressions_EN)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help="report table: .csv, .tsv, .jsonl, .json or .parquet")
    add_table_column_arguments(parser)
    parser.add_argument(
        "--vocabulary",
        default=None,
        metavar="PATH",
        help="organ vocabulary YAML (default: configs/organs.yaml)",
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="CSV",
        help="also write every report's tags: the image column, then <organ>_present and <organ>_abnormal",
    )


def _pct(count: int, total: int) -> str:
    return f"{count} ({100.0 * count / total:.1f}%)" if total else "0"


def format_table(rows: list[dict], vocabulary: Vocabulary) -> str:
    """The per-organ frequency table as aligned text."""
    header = ["organ", "present", "absent", "unknown", "abnormal", "normal", "unknown"]
    keys = ["present", "absent", "present_unknown", "abnormal", "normal", "abnormal_unknown"]
    lines = [header] + [[vocabulary[r["organ"]].display, *(_pct(r[k], r["n"]) for k in keys)] for r in rows]
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(w) if c == 0 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    rule = (
        " " * (widths[0] + 2)
        + "visibility".center(sum(widths[1:4]) + 4)
        + "  "
        + "abnormality".center(sum(widths[4:]) + 4)
    )
    return "\n".join([rule.rstrip(), *text])


def warnings_for(rows: list[dict], vocabulary: Vocabulary) -> list[str]:
    """One line per organ that never appears, or whose known tags are all one value."""
    out = []
    for r in rows:
        name = vocabulary[r["organ"]].display
        if r["present_unknown"] == r["n"] and r["abnormal_unknown"] == r["n"]:
            out.append(f"{name}: no report says anything about it (all tags unknown); add report synonyms?")
            continue
        single = []
        for tag, values in (("present", ("present", "absent")), ("abnormal", ("abnormal", "normal"))):
            counts = {v: r[v] for v in values}
            known = sum(counts.values())
            if known and max(counts.values()) == known:
                only = next(v for v, c in counts.items() if c)
                single.append(f"'{tag}' is always '{only}' ({known} known)")
        if single:
            out.append(f"{name}: {'; '.join(single)}: nothing to contrast it with")
    return out


def _write_tags(
    path: Path, images: list[str], image_column: str, matrix: np.ndarray, vocabulary: Vocabulary
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            [image_column, *(f"{n}_{t}" for n in vocabulary.names for t in ("present", "abnormal"))]
        )
        for image, tags in zip(images, matrix, strict=True):
            writer.writerow([image, *tags.reshape(-1).tolist()])


def run(args: argparse.Namespace) -> int:
    vocabulary = load_vocabulary(args.vocabulary)
    table = Path(args.table)
    if not table.is_file():
        raise DataError(f"report table not found: {table}")
    records = read_report_table(table, args.image_column, list(args.report_columns), check_images=False)
    matrix = tag_matrix((r["report"] for r in records), vocabulary)
    rows = tag_frequencies(matrix, vocabulary)
    print(f"{table}: {len(records)} reports, {len(vocabulary)} organs ({vocabulary.source})")
    print(format_table(rows, vocabulary))
    for line in warnings_for(rows, vocabulary):
        print(f"warning: {line}", file=sys.stderr)
    if args.output:
        images = [os.path.relpath(r["image"], table.resolve().parent) for r in records]
        _write_tags(Path(args.output), images, args.image_column, matrix, vocabulary)
        print(f"wrote per-report tags to {args.output}")
    return 0
