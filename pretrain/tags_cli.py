"""``mosmos tags TABLE``: parse a report table into organ tags and print how often each tag occurs.

Run it on a new corpus before training, to see whether it suits the vocabulary: per organ, the share
of reports with a known present and abnormal tag; a warning when most tags are unknown (the reports
say little about these organs: a chest corpus read with abdominal organs, say), when an organ is never
mentioned, or when its tag is always the same value: each gives the pixel-tag attention nothing to
learn from.
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


def _share(count: int, total: int) -> str:
    return f"{100.0 * count / total:.0f}%" if total else "-"


def format_table(rows: list[dict], vocabulary: Vocabulary) -> str:
    """The per-organ frequency table as aligned text; the last two columns are the share of reports
    with a known (not unknown) present and abnormal tag."""
    header = ["organ", "present", "absent", "unknown", "abnormal", "normal", "unknown", "present", "abnormal"]
    keys = ["present", "absent", "present_unknown", "abnormal", "normal", "abnormal_unknown"]
    lines = [header] + [
        [
            vocabulary[r["organ"]].display,
            *(_pct(r[k], r["n"]) for k in keys),
            _share(r["n"] - r["present_unknown"], r["n"]),
            _share(r["n"] - r["abnormal_unknown"], r["n"]),
        ]
        for r in rows
    ]
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
        + "abnormality".center(sum(widths[4:7]) + 4)
        + "  "
        + "known".center(sum(widths[7:]) + 2)
    )
    return "\n".join([rule.rstrip(), *text])


def coverage(rows: list[dict]) -> dict[str, float | list[str]]:
    """How much the corpus says about the vocabulary: the share of (report, organ) pairs with a
    known present and abnormal tag, and the organs no report mentions."""
    total = sum(r["n"] for r in rows)
    return {
        "known_present": sum(r["n"] - r["present_unknown"] for r in rows) / total if total else 0.0,
        "known_abnormal": sum(r["n"] - r["abnormal_unknown"] for r in rows) / total if total else 0.0,
        "never_mentioned": [
            r["organ"] for r in rows if r["present_unknown"] == r["n"] and r["abnormal_unknown"] == r["n"]
        ],
    }


def corpus_warnings(rows: list[dict], vocabulary: Vocabulary) -> list[str]:
    """Warnings about the corpus as a whole: most tags unknown, organs never mentioned."""
    cov = coverage(rows)
    out = []
    if rows and min(cov["known_present"], cov["known_abnormal"]) < 0.5:
        out.append(
            f"most tags are unknown ({100 * (1 - cov['known_present']):.0f}% of present and "
            f"{100 * (1 - cov['known_abnormal']):.0f}% of abnormal tags): the reports say little about these "
            f"organs; check that the vocabulary suits the corpus (chest or abdominal CT) or narrow data.organs"
        )
    never = cov["never_mentioned"]
    if never:
        names = ", ".join(vocabulary[o].display for o in never)
        out.append(
            f"{len(never)} of {len(rows)} organs are never mentioned: {names} "
            "(add report synonyms to the vocabulary, or leave them out with data.organs)"
        )
    return out


def warnings_for(rows: list[dict], vocabulary: Vocabulary) -> list[str]:
    """One line per organ whose known tags are all one value (organs never mentioned are listed
    together by :func:`corpus_warnings`)."""
    out = []
    for r in rows:
        name = vocabulary[r["organ"]].display
        if r["present_unknown"] == r["n"] and r["abnormal_unknown"] == r["n"]:
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
    cov = coverage(rows)
    print(
        f"known tags: {100 * cov['known_present']:.1f}% of present, {100 * cov['known_abnormal']:.1f}% of "
        f"abnormal (over every report and organ); never mentioned: {len(cov['never_mentioned'])} of {len(rows)} organs"
    )
    for line in [*corpus_warnings(rows, vocabulary), *warnings_for(rows, vocabulary)]:
        print(f"warning: {line}", file=sys.stderr)
    if args.output:
        images = [os.path.relpath(r["image"], table.resolve().parent) for r in records]
        _write_tags(Path(args.output), images, args.image_column, matrix, vocabulary)
        print(f"wrote per-report tags to {args.output}")
    return 0
