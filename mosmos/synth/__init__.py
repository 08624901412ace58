"""Synthetic abdominal CT: phantoms with reports for pretraining, partially labelled segmentation sets.

``synthesize(out_dir)`` writes, deterministically for a given seed::

    out_dir/
      synth.json, README.txt                 what was generated (seed, counts, shape, organs, finding
                                             codes, per-organ tag class counts)
      pretrain/images/train_0001.nii.gz      int16 HU volumes, varied spacing and orientation
      pretrain/reports.csv                   VolumeName, Findings_EN, Impressions_EN (CT-RATE columns)
      pretrain/ground_truth/findings.json    per case and organ: status, findings, geometry, report meta
      pretrain/ground_truth/labels/*.nii.gz  uint8 organ maps (ids in labels.json)
      nnUNet_raw/Dataset01{1,2,3}_*/         nnU-Net v2 raw datasets, each labelling different organs
      nnUNet_raw/Dataset099_SynthTest/       fully labelled test set
      seg_ground_truth.json                  findings of the segmentation and test cases
"""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from mosmos.errors import MosmosError
from mosmos.synth.anatomy import PHANTOM_ORGANS
from mosmos.synth.datasets import PRETRAIN_SPLIT, SEG_DATASETS, TEST_DATASET, SegDataset
from mosmos.synth.pathology import FINDING_ORGANS, RESECTIONS
from mosmos.synth.phantom import CaseSpec, make_case
from mosmos.synth.reports import findings_to_tags
from mosmos.synth.writer import dataset_json, write_json, write_nifti, write_reports
from mosmos.vocabulary import load_vocabulary

__all__ = ["PHANTOM_ORGANS", "findings_to_tags", "synthesize"]

DEFAULT_SHAPE = (64, 64, 40)
MIN_SHAPE = (24, 24, 16)
MAX_SIDE = 512
_OUTPUTS = ("pretrain", "nnUNet_raw", "seg_ground_truth.json", "synth.json", "README.txt")


def _check(seed: int, counts: dict[str, int], shape: tuple[int, ...]) -> tuple[int, int, int]:
    if not isinstance(seed, int) or seed < 0:
        raise MosmosError(f"seed must be a non-negative integer, got {seed!r}")
    for name, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise MosmosError(f"{name} must be a non-negative integer, got {n!r}")
    if len(shape) != 3 or not all(isinstance(v, int) for v in shape):
        raise MosmosError(f"shape must be three integers X Y Z, got {shape!r}")
    if any(v < m for v, m in zip(shape, MIN_SHAPE, strict=True)) or max(shape) > MAX_SIDE:
        raise MosmosError(
            f"shape {tuple(shape)} is out of range: each side must be at least {MIN_SHAPE} (X, Y, Z) so "
            f"organs keep several voxels at the 10 mm spacing limit, and at most {MAX_SIDE}"
        )
    return int(shape[0]), int(shape[1]), int(shape[2])


def _prepare(out: Path) -> None:
    """Refuse to write into a directory that holds anything but an earlier synth output."""
    if out.exists() and not out.is_dir():
        raise MosmosError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "synth.json").is_file():
            raise MosmosError(
                f"--out {out} is not empty and holds no synth.json; choose an empty or new directory"
            )
        for name in _OUTPUTS:  # a previous run: replace it whole so no stale case survives
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _tag_counts(records: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    counts = {o: {"present": Counter(), "abnormal": Counter()} for o in PHANTOM_ORGANS}
    for rec in records:
        for organ, (present, abnormal) in findings_to_tags(rec).items():
            counts[organ]["present"][str(present)] += 1
            counts[organ]["abnormal"][str(abnormal)] += 1
    return {o: {k: {v: c[v] for v in ("1", "0", "-1")} for k, c in d.items()} for o, d in counts.items()}


def _pretrain_case(job: tuple[Path, int, int, tuple[int, int, int]]) -> tuple[dict, str, dict]:
    """Make and write pretraining case ``i`` (a top-level function so worker processes can run it).

    Every case draws from its own stream spawned from ``(seed, split, i)``, so the bytes do not
    depend on which process makes it or in which order.
    """
    pre, seed, i, shape = job
    case_id = f"train_{i + 1:04d}"
    spec = CaseSpec(case_id, (seed, PRETRAIN_SPLIT, i), shape, resections=True, fov_cuts=True, report=True)
    case = make_case(spec)
    volume = f"{case_id}.nii.gz"
    write_nifti(pre / "images" / volume, case.image, case.affine)
    write_nifti(pre / "ground_truth" / "labels" / volume, case.labels, case.affine)
    findings_en, impressions_en = case.report
    row = {"VolumeName": volume, "Findings_EN": findings_en, "Impressions_EN": impressions_en}
    return row, case_id, {"volume": volume, **case.record}


def _write_seg(out: Path, ds: SegDataset, seed: int, n: int, shape: tuple, bar: tqdm) -> dict[str, dict]:
    root = out / "nnUNet_raw" / ds.folder
    lut = ds.lookup_table(load_vocabulary())
    records = {}
    for i in range(n):
        case_id = f"{ds.prefix}_{i + 1:04d}"
        case = make_case(CaseSpec(case_id, (seed, ds.split, i), shape, noise=ds.noise))
        write_nifti(root / "imagesTr" / f"{case_id}_0000.nii.gz", case.image, case.affine)
        write_nifti(root / "labelsTr" / f"{case_id}.nii.gz", lut[case.labels], case.affine)
        records[case_id] = case.record
        bar.update()
    write_json(root / "dataset.json", dataset_json(ds.folder.split("_", 1)[1], ds.labels, n, ds.description))
    return records


def synthesize(
    out_dir: str | Path,
    seed: int = 0,
    pretrain_cases: int = 600,
    seg_cases: int = 20,
    test_cases: int = 12,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    progress: bool = True,
    workers: int = 1,
) -> dict:
    """Generate the synthetic data set into ``out_dir`` (same seed, same bytes).

    Args:
        out_dir: output directory; must be empty, new, or an earlier synth output (replaced).
        seed: master seed; every case draws from its own stream spawned from it.
        pretrain_cases: image-report pairs for stage 1.
        seg_cases: cases in each of the three partially labelled segmentation datasets.
        test_cases: cases in the fully labelled test dataset.
        shape: voxels per volume (X, Y, Z); spacing adapts so the abdomen fits, up to 10 mm.
        progress: show a progress bar.
        workers: processes that make the pretraining cases (same bytes whatever the number).

    Returns:
        A summary: seed, shape, organs, counts, paths, nnU-Net label dicts, per-organ tag class
        counts, finding counts, and the wall time in seconds.
    """
    shape = _check(
        seed,
        {"pretrain_cases": pretrain_cases, "seg_cases": seg_cases, "test_cases": test_cases},
        tuple(shape),
    )
    if not isinstance(workers, int) or workers < 1:
        raise MosmosError(f"workers must be a positive integer, got {workers!r}")
    start = time.perf_counter()
    out = Path(out_dir)
    _prepare(out)
    total = pretrain_cases + seg_cases * len(SEG_DATASETS) + test_cases
    bar = tqdm(total=total, desc="mosmos synth", unit="case", disable=not progress)

    pre = out / "pretrain"
    records, rows = {}, []
    jobs = [(pre, seed, i, shape) for i in range(pretrain_cases)]
    pool = None
    if workers > 1 and pretrain_cases > 1:
        # spawn, not fork: the parent may hold torch's thread pools, which a forked child inherits
        # in an undefined state
        pool = ProcessPoolExecutor(
            min(workers, pretrain_cases), mp_context=multiprocessing.get_context("spawn")
        )
    with pool or contextlib.nullcontext():
        chunk = max(1, min(32, pretrain_cases // (4 * workers)))
        made = pool.map(_pretrain_case, jobs, chunksize=chunk) if pool else map(_pretrain_case, jobs)
        for row, case_id, record in made:  # in case order
            rows.append(row)
            records[case_id] = record
            bar.update()
    write_reports(pre / "reports.csv", rows)
    write_json(pre / "ground_truth" / "findings.json", records)
    labels = {"background": 0, **{o: i + 1 for i, o in enumerate(PHANTOM_ORGANS)}}
    write_json(pre / "ground_truth" / "labels.json", labels)

    seg_records = {ds.folder: _write_seg(out, ds, seed, seg_cases, shape, bar) for ds in SEG_DATASETS}
    seg_records[TEST_DATASET.folder] = _write_seg(out, TEST_DATASET, seed, test_cases, shape, bar)
    bar.close()
    write_json(out / "seg_ground_truth.json", seg_records)

    datasets = [*SEG_DATASETS, TEST_DATASET]
    summary = {
        "generator": "mosmos synth",
        "seed": seed,
        "shape": list(shape),
        "organs": PHANTOM_ORGANS,
        "counts": {
            "pretrain": pretrain_cases,
            "seg": {ds.folder: seg_cases for ds in SEG_DATASETS},
            "test": test_cases,
        },
        "paths": {
            "pretrain_images": "pretrain/images",
            "reports": "pretrain/reports.csv",
            "findings": "pretrain/ground_truth/findings.json",
            "labels": "pretrain/ground_truth/labels",
            "labels_json": "pretrain/ground_truth/labels.json",
            "nnunet_raw": "nnUNet_raw",
            "datasets": {ds.folder: f"nnUNet_raw/{ds.folder}" for ds in datasets},
            "seg_ground_truth": "seg_ground_truth.json",
        },
        "datasets": {ds.folder: {"background": 0, **ds.labels} for ds in datasets},
        "findings": {
            organ: [code for code, organs in FINDING_ORGANS.items() if organ in organs]
            + ([RESECTIONS[organ]] if organ in RESECTIONS else [])
            for organ in PHANTOM_ORGANS
        },
        "tag_counts": _tag_counts(list(records.values())),
        "finding_counts": dict(
            sorted(
                Counter(
                    f for r in records.values() for e in r["organs"].values() for f in e["findings"]
                ).items()
            )
        ),
        "orientation_counts": dict(sorted(Counter(r["orientation"] for r in records.values()).items())),
        "fov_cut_counts": dict(sorted(Counter(r["fov_cut"] for r in records.values()).items())),
    }
    write_json(out / "synth.json", summary)
    (out / "README.txt").write_text(_readme(summary), encoding="utf-8")
    return {**summary, "out_dir": str(out.resolve()), "seconds": round(time.perf_counter() - start, 2)}


def _readme(summary: dict) -> str:
    counts = summary["counts"]
    lines = [
        "Synthetic abdominal CT generated by `mosmos synth` (all data artificial; no patient data).",
        f"seed {summary['seed']}, volume shape {summary['shape']} voxels, organs: {', '.join(summary['organs'])}.",
        "",
        f"pretrain/: {counts['pretrain']} image-report pairs. images/*.nii.gz are int16 Hounsfield units with",
        "  real, anisotropic spacing in the affine and mixed orientations (RAS, LPS, z-flipped); reports.csv has",
        "  CT-RATE columns VolumeName, Findings_EN, Impressions_EN. ground_truth/ holds what a model must not",
        "  read: findings.json (per organ status normal/abnormal/absent/out_of_view and finding codes) and",
        "  organ label maps (ids in labels.json).",
        "nnUNet_raw/: nnU-Net v2 raw datasets; each labels a different subset of organs with its own names:",
    ]
    for folder, labels in summary["datasets"].items():
        lines.append(f"  {folder}: {labels}")
    lines.append(
        "Finding codes per organ (findings.json, seg_ground_truth.json; resections make an organ absent):"
    )
    for organ, codes in summary["findings"].items():
        lines.append(f"  {organ}: {', '.join(codes)}")
    lines.append(
        "Report tags of the pretraining cases (counts of 1 / 0 / -1), as findings_to_tags derives them:"
    )
    for organ, tags in summary["tag_counts"].items():
        present, abnormal = (
            "/".join(str(tags[k][v]) for v in ("1", "0", "-1")) for k in ("present", "abnormal")
        )
        lines.append(f"  {organ}: present {present}, abnormal {abnormal}")
    lines += [
        "seg_ground_truth.json: findings of the segmentation and test cases.",
        "synth.json: this summary, machine-readable.",
        "",
    ]
    return "\n".join(lines)
