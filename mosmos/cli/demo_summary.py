"""What ``mosmos demo`` writes at its end: ``summary.md`` with the stage results, the test Dice per
organ, attention montages, the prediction overlay and the benchmark plots (see :mod:`mosmos.cli.demo`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

_MONTAGE_ORGANS = ("liver", "kidney_left", "aorta")  # the summary's attention montages


def organ_dice(summary: dict) -> dict[str, float]:
    """``{organ: Dice}`` from an evaluation summary's ``dice/<dataset>/<organ>`` keys."""
    return {k.rsplit("/", 1)[1]: v for k, v in summary.items() if k.startswith("dice/") and k.count("/") == 2}


def _copy(src: Path, dst_dir: Path) -> str | None:
    if not src.is_file():
        return None
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst_dir / src.name)
    return f"{dst_dir.name}/{src.name}"


def prediction_overlay(scan: Path, test: Path, predictions: Path, label_map: Path, path: Path) -> Path:
    """The predicted scan's overlay as stage 2 draws its validation overlays (prediction filled, the
    test set's ground truth outlined), label ids matched by organ name through both ``dataset.json``."""
    import nibabel as nib
    import numpy as np

    from mosmos.finetune.overlays import case_overlay

    predicted_ids = json.loads((predictions / "dataset.json").read_text(encoding="utf-8"))["labels"]
    truth_ids = json.loads((test / "dataset.json").read_text(encoding="utf-8"))["labels"]
    organs = [o for o, i in sorted(predicted_ids.items(), key=lambda kv: kv[1]) if i > 0]
    prediction = np.asarray(nib.load(str(label_map)).dataobj).astype(np.int16)
    case = label_map.name.removesuffix(".nii.gz")
    truth_file = test / "labelsTr" / f"{case}.nii.gz"
    truth = np.zeros_like(prediction)
    if truth_file.is_file():
        raw = np.asarray(nib.load(str(truth_file)).dataobj).astype(np.int16)
        for organ, i in truth_ids.items():
            if organ in predicted_ids and i > 0:
                truth[raw == i] = predicted_ids[organ]
    png = case_overlay(scan, truth, prediction, organs, f"{test.name} {case}: mosmos predict")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def write_summary(
    out: Path,
    budget: dict[str, list[str]] | None,
    lines: dict[str, str],
    evaluation: dict,
    stage1_run: Path,
    bench: Path,
    overlay: Path | None,
    elapsed: float,
) -> Path:
    figures = out / "summary_files"
    rows = sorted(organ_dice(evaluation).items())
    md = [
        "# mosmos demo",
        "",
        f"Budget: **{'quick' if budget else 'full'}**, {elapsed / 60:.1f} minutes on {os.cpu_count()} CPU(s). "
        "Generated abdominal CT phantoms with reports (stage 1) and three partially labelled datasets "
        "(stage 2); every number is on held-out generated data.",
        "",
        "| stage | result |",
        "|---|---|",
        *(f"| {stage} | {text} |" for stage, text in lines.items()),
        "",
        "## Test Dice per organ (stage 2 model, fully labelled test set)",
        "",
        "| organ | Dice |",
        "|---|---|",
        *(f"| {organ} | {dice:.3f} |" for organ, dice in rows),
        "",
        "## Pixel-tag attention (stage 1, held-out scans)",
        "",
        "Each organ's attention map (jet), its peak (+) and the organ's contour (green).",
        "",
    ]
    for organ in _MONTAGE_ORGANS:
        name = _copy(stage1_run / "attention" / f"montage_{organ}.png", figures)
        if name:
            md += [f"![{organ} attention]({name})", ""]
    if overlay is not None:
        md += [
            "## A prediction",
            "",
            "`mosmos predict` on one test scan: each predicted organ filled, the ground truth outlined.",
            "",
            f"![prediction]({figures.name}/{overlay.name})",
            "",
        ]
    md += ["## Initialisation benchmark", "", f"Full report: `{bench / 'summary.md'}`.", ""]
    for png in sorted(bench.glob("*.png")):
        name = _copy(png, figures)
        if name:
            md += [f"![{png.stem}]({name})", ""]
    if budget:
        md += [
            "## Reproduce by hand",
            "",
            "The shipped configs (configs/pretrain/demo.yaml, configs/finetune/demo.yaml, "
            "configs/benchmark/demo.yaml) with these overrides (`{data}` is " + f"`{out / 'data'}`):",
            "",
            *(f"- {stage}: `{' '.join(ov)}`" for stage, ov in budget.items()),
            "",
            "`mosmos demo --full` runs the configs as shipped (an hour or more on two cores).",
            "",
        ]
    path = out / "summary.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path
