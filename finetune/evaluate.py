"""``mosmos evaluate --model RUN --data DATASET [--output DIR] [--task NAME]``.

Evaluates a trained segmenter on every labelled case of a dataset in any supported layout (nnU-Net
raw, MSD, datalist JSON), including a fully labelled test set: Dice and HD95 per case and organ, in
each case's original geometry, on the organs the dataset labels and the model predicts.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mosmos.errors import ConfigError
from mosmos.io import write_json

logger = logging.getLogger("mosmos")


def evaluate_run(
    model_dir: str | Path,
    data: str | Path,
    output: str | Path | None = None,
    task: str | None = None,
    vocabulary: str | None = None,
    device: str | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    label_map: dict[str, str] | None = None,
    ignore_labels: list[str] | None = None,
    hd95: bool = True,
) -> dict:
    """Evaluate ``model_dir`` on ``data``; writes ``metrics.json`` and ``cases.csv`` to ``output``.

    Returns:
        The summary (``mean_dice``, ``dice/<dataset>/<organ>``, ...).
    """
    import torch
    from tqdm.auto import tqdm

    from mosmos.finetune.inference import Predictor, decode_probabilities, load_model
    from mosmos.finetune.metrics import case_metrics, format_dice_table, summarize, write_case_csv
    from mosmos.finetune.train import load_label
    from mosmos.segdata.dataset import read_seg_dataset
    from mosmos.vocabulary import load_vocabulary

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, spec = load_model(model_dir, device)
    task_id = spec.task_index(task)
    vocab = load_vocabulary(vocabulary)
    ds = read_seg_dataset(data, vocab, label_map=label_map, ignore=ignore_labels)
    organs = [o for o in ds.organs if o in spec.organs]
    if not organs:
        raise ConfigError(
            f"{data}: the dataset labels {ds.organs}, none of which the model predicts ({spec.organs})"
        )
    skipped = [o for o in ds.organs if o not in spec.organs]
    if skipped:
        logger.warning(
            "%s labels %s, which the model does not predict; they are not scored", ds.name, skipped
        )
    cases = [c for c in [*ds.train, *ds.test] if c.label is not None]
    if not cases:
        raise ConfigError(f"{data}: no labelled cases to evaluate")
    # every case is checked before any prediction: a score over a silently shortened test set would
    # mislead, so bad cases stop the evaluation, all of them named
    from mosmos.check.cases import check_cases
    from mosmos.check.datasets import dataset_case_files
    from mosmos.check.startup import raise_for_problems

    raise_for_problems(
        check_cases(dataset_case_files(ds, cases), workers=2),
        f"--data {data}",
        hint="Fix them (or remove the cases) and evaluate again; `mosmos check` lists every problem.",
    )
    lut = ds.lookup_table(spec.organs)
    predictor = Predictor(model, spec, device, overlap=overlap, sw_batch_size=sw_batch_size)
    rows = []
    for case in tqdm(cases, desc=f"evaluate {ds.name}", dynamic_ncols=True):
        probs, _ = predictor.probabilities(case.image, task=task_id)
        pred = decode_probabilities(probs, spec.strategy)
        label, spacing = load_label(case.label, lut, ds.name)
        for row in case_metrics(pred, label, spec.organs, organs, spacing, hd95):
            rows.append({"dataset": ds.name, "case": case.case_id, **row})
    summary = summarize(rows)
    output = Path(output) if output else Path(model_dir) / f"eval_{ds.name}"
    output.mkdir(parents=True, exist_ok=True)
    write_case_csv(rows, output / "cases.csv")
    write_json(
        output / "metrics.json",
        {
            "model": str(model_dir),
            "data": str(data),
            "task": task,
            "cases": len(cases),
            "organs": organs,
            "summary": summary,
        },
    )
    print(format_dice_table(summary, organs))
    print(
        f"mean Dice {summary['mean_dice']:.3f} over {len(cases)} cases; per-case results in {output}/cases.csv"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mosmos evaluate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    run_from_args(args)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mosmos.finetune.predict import add_inference_arguments

    add_inference_arguments(parser)
    parser.add_argument("--data", required=True, help="dataset folder (nnU-Net / MSD) or datalist JSON")
    parser.add_argument(
        "--output", help="where metrics.json and cases.csv go (default: MODEL/eval_<dataset>)"
    )
    parser.add_argument("--vocabulary", help="organ vocabulary YAML (default: configs/organs.yaml)")


def run_from_args(args: argparse.Namespace) -> dict:
    return evaluate_run(
        args.model,
        args.data,
        args.output,
        task=args.task,
        vocabulary=args.vocabulary,
        device=args.device,
        overlap=args.overlap,
    )
