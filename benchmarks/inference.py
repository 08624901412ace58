"""Sliding-window prediction of whole volumes: ``Predictor`` against MONAI's defaults, at equal Dice.

Ours is ``mosmos.finetune.inference.Predictor.probabilities``: preprocessing, a sliding window
(overlap 0.25, gaussian blending, ``sw_batch_size`` 2, one pass per task for task-conditioned
models), inversion to the input geometry. The baseline is the same ``Predictor`` with
``monai.inferers.sliding_window_inference`` at its defaults (``sw_batch_size=1``, constant
blending) and the same overlap: the same model, preprocessing, task passes and inversion; only
the window settings differ. Both are timed on the whole prediction (file to probabilities in the
input's grid), in alternation, best of a few rounds; the goal is on the window part alone (from
the same runs), the only part that differs.

Equal Dice: with a trained model (``model_dir``, a stage 2 run directory trained on ``mosmos
synth`` data, e.g. ``make demo``'s ``demo_out/finetune``), each path's Dice against the test
labels. Always: the Dice between the two paths' label maps, per organ present in either, mean; the
blending differs, so where windows disagree (random or weak weights) it decides some voxels. Without
``model_dir`` the networks are the CPU demo's U-Net (``configs/finetune/demo.yaml``) and MO-CTranS
on the same encoder (a pass per task), with random weights: timing needs only the architecture.
``quick`` uses one volume, coarser voxels and a smaller window (2 x 2 x 2 windows a volume either
way).

    python benchmarks/inference.py [--quick] [--device cpu] [--model RUN_DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, best_of, format_rows, row, synth

from mosmos.finetune.inference import ModelSpec, Predictor, decode_probabilities

TASK_DATASETS = ("Dataset011_AbdomenA", "Dataset012_KidneyB", "Dataset013_VesselsC")
TEST_DATASET = "Dataset099_SynthTest"


def demo_model(
    name: str, data: Path, device: str, spacing: list[float] | None = None, window: list[int] | None = None
) -> tuple[torch.nn.Module, ModelSpec]:
    """The stage 2 demo network ``name`` (random weights) and its spec, for the organs and tasks of
    the generated segmentation datasets in ``data``; ``spacing`` (mm) and ``window`` (voxels)
    default to the demo's."""
    from mosmos.config import load_config
    from mosmos.finetune.config import FinetuneConfig
    from mosmos.finetune.pretrained import build_segmenter
    from mosmos.segdata.dataset import read_seg_dataset
    from mosmos.transforms import PreprocessConfig
    from mosmos.vocabulary import load_vocabulary

    cfg = load_config(FinetuneConfig, REPO / "configs/finetune/demo.yaml", [])
    vocab = load_vocabulary(None)
    tasks = [read_seg_dataset(data / "nnUNet_raw" / d, vocab) for d in TASK_DATASETS]
    organs = [o for o in vocab.names if any(o in t.organs for t in tasks)]
    torch.manual_seed(0)
    model, _ = build_segmenter(
        name,
        num_classes=len(organs),
        num_tasks=len(tasks),
        encoder=cfg.model.encoder,
        encoder_kwargs=cfg.model.encoder_kwargs,
    )
    pre = PreprocessConfig(
        spacing=spacing or cfg.data.spacing, size=window or cfg.data.patch_size, resize_mode="pad"
    )
    spec = ModelSpec(
        name=name,
        encoder=cfg.model.encoder,
        encoder_kwargs=model.encoder.encoder_config(),
        decoder=model.decoder_config(),
        attention_head=None,
        organs=organs,
        tasks=[{"name": t.name, "organs": t.organs} for t in tasks],
        organ_task={o: next(i for i, t in enumerate(tasks) if o in t.organs) for o in organs},
        strategy=cfg.train.strategy,
        preprocess=pre.to_dict(),
        extra={},
    )
    return model.to(device).eval(), spec


def label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice of two label maps over the labels (not background) either one holds (1.0 if none)."""
    scores = []
    for k in np.union1d(np.unique(a), np.unique(b)):
        if k == 0:
            continue
        pa, pb = a == k, b == k
        scores.append(2 * np.logical_and(pa, pb).sum() / (pa.sum() + pb.sum()))
    return float(np.mean(scores)) if scores else 1.0


def time_predictions(
    predictors: dict[str, Predictor], images: list[Path], repeats: int, device: str
) -> tuple[dict[str, float], dict[str, float], dict[str, list[torch.Tensor]]]:
    """Whole-prediction and window-part seconds over ``images`` (best round) and the probabilities."""
    windows: dict[str, list[float]] = {name: [] for name in predictors}
    outputs: dict[str, list[torch.Tensor]] = {}

    def run(name: str) -> None:
        p, spent, outs = predictors[name], 0.0, []
        for path in images:
            image, x = p.preprocess(path)
            start = time.perf_counter()
            probs = p.window_probabilities(x)
            spent += time.perf_counter() - start  # ends on the CPU tensor: nothing left queued
            outs.append(p.invert(image, probs))
        windows[name].append(spent)
        outputs[name] = outs

    total = best_of({name: (lambda n=name: run(n)) for name in predictors}, repeats, device)
    return total, {name: min(ts) for name, ts in windows.items()}, outputs


def ground_truth_dice(probs: list[torch.Tensor], spec: ModelSpec, test: Path) -> float:
    """Mean Dice against the test set's labels (the organs it labels that the model predicts)."""
    from mosmos.finetune.metrics import case_metrics
    from mosmos.finetune.train import load_label
    from mosmos.segdata.dataset import read_seg_dataset
    from mosmos.vocabulary import load_vocabulary

    ds = read_seg_dataset(test, load_vocabulary(None))
    cases = [c for c in [*ds.train, *ds.test] if c.label is not None]
    organs, lut = [o for o in ds.organs if o in spec.organs], ds.lookup_table(spec.organs)
    scores = []
    for case, p in zip(cases, probs, strict=True):
        label, spacing = load_label(case.label, lut, ds.name)
        pred = decode_probabilities(p, spec.strategy)
        scores += [r["dice"] for r in case_metrics(pred, label, spec.organs, organs, spacing, hd95=False)]
    return float(np.mean(scores))


def _measure_model(
    label: str,
    model: torch.nn.Module,
    spec: ModelSpec,
    images: list[Path],
    repeats: int,
    device: str,
    test: Path | None = None,
) -> list[dict]:
    """Rows of one network; with ``test`` (a trained model) also Dice against its labels."""
    predictors = {
        "ours": Predictor(model, spec, device, overlap=0.25, sw_batch_size=2),
        "monai": Predictor(model, spec, device, overlap=0.25, sw_batch_size=1, mode="constant"),
    }
    total, windows, probs = time_predictions(predictors, images, repeats, device)
    agreement = np.mean(
        [
            label_agreement(decode_probabilities(a, spec.strategy), decode_probabilities(b, spec.strategy))
            for a, b in zip(probs["ours"], probs["monai"], strict=True)
        ]
    )
    what = f"{len(images)} volume(s), {len(predictors['ours']._plan(None))} task pass(es), best of {repeats}"
    base = "MONAI sliding_window_inference defaults (sw_batch_size 1, constant blending)"
    rows = [
        row(
            f"inference/{label}_predict",
            total["ours"],
            "s",
            total["monai"],
            base,
            inverse=True,
            note=f"whole prediction (read, preprocess, windows, invert); {what}",
        ),
        row(
            f"inference/{label}_windows",
            windows["ours"],
            "s",
            windows["monai"],
            base,
            inverse=True,
            goal=">= 1.0x",
            note=f"the sliding-window part (the only part that differs) of the same runs; {what}",
        ),
        row(
            f"inference/{label}_label_agreement",
            float(agreement),
            "Dice",
            note="Dice of ours vs the baseline's label maps (gaussian vs constant blending), mean over "
            "organs present in either; where windows disagree (random or weak weights) blending decides, "
            "so the Dice against ground truth (with a trained model) is the test of equal accuracy",
        ),
    ]
    if test is not None:
        rows.append(
            row(
                f"inference/{label}_dice",
                ground_truth_dice(probs["ours"], spec, test),
                "Dice",
                ground_truth_dice(probs["monai"], spec, test),
                "Dice of the MONAI-default path",
                goal=">= 0.99x",
                note="mean Dice against the test labels",
            )
        )
    return rows


def measure(quick: bool, device: str, stage: str, model_dir: str | Path | None = None) -> list[dict]:
    """Rows for stage 2 (none for ``stage == "1"``); ``model_dir`` measures a trained model instead
    of the random demo networks."""
    if stage == "1":
        return []
    volumes, repeats = (1, 3) if quick else (3, 3)
    # quick: coarser voxels and a smaller window, still 2 x 2 x 2 windows a volume, ~5x less work
    grid = {"spacing": [8.0, 8.0, 10.0], "window": [32, 32, 16]} if quick else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = synth(Path(tmp) / "data", pretrain_cases=1, seg_cases=1, test_cases=volumes)
        test = data / "nnUNet_raw" / TEST_DATASET
        images = sorted(test.glob("images*/*.nii.gz"))
        if model_dir is not None:
            from mosmos.finetune.inference import load_model

            model, spec = load_model(model_dir, device)
            return _measure_model("trained", model, spec, images, repeats, device, test)
        for name in ("unet", "mo_ctrans"):
            model, spec = demo_model(name, data, device, **grid)
            rows += _measure_model(name, model, spec, images, repeats, device)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="a stage 2 run directory trained on `mosmos synth` data")
    args = parser.parse_args()
    print(format_rows(measure(args.quick, args.device, "2", args.model)))


if __name__ == "__main__":
    main()
