"""``mosmos evaluate (--model RUN | --predictions DIR) --data DATASET [data.label_map.<name>.<label>=<organ> ...]``.

Scores a trained segmenter, or a folder of existing predictions (from ``mosmos predict``, nnU-Net,
TotalSegmentator ...), on every labelled case of a dataset in any supported layout (nnU-Net raw, MSD,
datalist JSON), including a fully labelled test set: Dice and HD95 per case and organ, in each case's
original geometry, on the organs both the dataset and the model (or the predictions) have.

The dataset's labels map to organs as in fine-tuning: by the vocabulary's spellings, with the same
``data.label_map``, ``data.ignore_labels``, ``data.labels`` and ``data.vocabulary`` keys, given as
dotted overrides or read from a fine-tuning config (``--config``, e.g. the run's ``config.yaml``).
A prediction folder's label ids are read from its ``dataset.json`` ``labels`` (``{name: id}``, as
nnU-Net and ``mosmos predict`` write it) or ``labels.json`` (``{id: name}``) and mapped the same way,
under the dataset name ``predictions`` (``data.label_map.predictions.<label>=<organ>``); a folder
with neither uses the dataset's own label ids.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mosmos.errors import ConfigError, DataError
from mosmos.io import write_json

logger = logging.getLogger("mosmos")

#: The fine-tuning keys ``mosmos evaluate`` takes.
MAPPING_KEYS = ("data.label_map", "data.ignore_labels", "data.labels", "data.vocabulary")
PREDICTIONS = "predictions"  # the dataset name a prediction folder's labels are configured under


def label_options(config: str | None = None, overrides: list[str] | None = None) -> Any:
    """The ``data`` section (of :class:`FinetuneConfig`) holding the label-mapping keys of a
    fine-tuning ``config`` and ``overrides``; any other override is an error."""
    from mosmos.config import load_config
    from mosmos.finetune.config import FinetuneConfig

    overrides = list(overrides or [])
    for text in overrides:
        key = text.split("=", 1)[0]
        if "=" not in text or not any(key == k or key.startswith(k + ".") for k in MAPPING_KEYS):
            raise ConfigError(
                f"{text!r}: mosmos evaluate takes only {', '.join(MAPPING_KEYS)} overrides (KEY=VALUE, as in fine-tuning)"
            )
    base = [] if config else ["data.datasets=[evaluate]"]  # the fine-tuning schema wants a dataset
    return load_config(FinetuneConfig, config, base + overrides).data


def _read_dataset(data: str | Path, options: Any, vocabulary: str | None) -> Any:
    from mosmos.segdata.dataset import read_seg_dataset, seg_dataset_name
    from mosmos.vocabulary import load_vocabulary

    vocab = load_vocabulary(vocabulary or options.vocabulary)
    name = seg_dataset_name(data)
    ds = read_seg_dataset(
        data,
        vocab,
        label_map=options.label_map.get(name),
        ignore=options.ignore_labels.get(name),
        labels=options.labels.get(name),
    )
    return ds, vocab


def _labelled_cases(ds: Any, data: str | Path) -> list[Any]:
    """Every labelled case, each checked before any scoring: a score over a silently shortened
    test set would mislead, so bad cases stop the evaluation, all of them named."""
    from mosmos.check.cases import check_cases
    from mosmos.check.datasets import dataset_case_files
    from mosmos.check.startup import raise_for_problems

    cases = [c for c in [*ds.train, *ds.test] if c.label is not None]
    if not cases:
        raise ConfigError(f"{data}: no labelled cases to evaluate")
    raise_for_problems(
        check_cases(dataset_case_files(ds, cases), workers=2),
        f"--data {data}",
        hint="Fix them (or remove the cases) and evaluate again; `mosmos check` lists every problem.",
    )
    return cases


def _scored_organs(ds: Any, predicted: list[str], source: str, data: str | Path) -> list[str]:
    organs = [o for o in ds.organs if o in predicted]
    if not organs:
        raise ConfigError(
            f"{data}: the dataset labels {ds.organs}, none of which {source} predicts ({predicted})"
        )
    skipped = [o for o in ds.organs if o not in predicted]
    if skipped:
        logger.warning(
            "%s labels %s, which %s does not predict; they are not scored", ds.name, skipped, source
        )
    return organs


def _score(
    ds: Any,
    cases: list[Any],
    predicted: list[str],
    scored: list[str],
    prediction: Callable[[Any], Any],
    hd95: bool,
) -> list[dict[str, Any]]:
    """Per case and organ rows; ``prediction(case)`` gives a label map (``k`` = ``predicted[k-1]``)."""
    from tqdm.auto import tqdm

    from mosmos.finetune.data import load_label
    from mosmos.finetune.metrics import case_metrics

    lut = ds.lookup_table(predicted)
    rows = []
    for case in tqdm(cases, desc=f"evaluate {ds.name}", dynamic_ncols=True):
        pred = prediction(case)
        label, spacing = load_label(case.label, lut, ds.name)
        if pred.shape != label.shape:
            raise DataError(
                f"{case.label}: the prediction's shape {pred.shape} differs from the label's {label.shape}"
            )
        for row in case_metrics(pred, label, predicted, scored, spacing, hd95):
            rows.append({"dataset": ds.name, "case": case.case_id, **row})
    return rows


def _write(rows: list[dict], output: Path, record: dict[str, Any], organs: list[str], cases: int) -> dict:
    from mosmos.finetune.metrics import format_dice_table, summarize, write_case_csv

    summary = summarize(rows)
    output.mkdir(parents=True, exist_ok=True)
    write_case_csv(rows, output / "cases.csv")
    write_json(output / "metrics.json", {**record, "cases": cases, "organs": organs, "summary": summary})
    print(format_dice_table(summary, organs))
    print(f"mean Dice {summary['mean_dice']:.3f} over {cases} cases; per-case results in {output}/cases.csv")
    return summary


def evaluate_run(
    model_dir: str | Path,
    data: str | Path,
    output: str | Path | None = None,
    task: str | None = None,
    vocabulary: str | None = None,
    device: str | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    mapping: Any = None,
    hd95: bool = True,
    tta: bool = False,
    precision: str = "float32",
) -> dict:
    """Evaluate ``model_dir`` on ``data``; writes ``metrics.json`` and ``cases.csv`` to ``output``.

    Args:
        mapping: the label-mapping keys (the ``data`` section :func:`label_options` gives; default: none).
        precision: ``float32`` (default: the scores validation gives), ``auto`` (float16 on CUDA) ...

    Returns:
        The summary (``mean_dice``, ``dice/<dataset>/<organ>``, ...).
    """
    from mosmos.finetune.inference import Predictor, decode_probabilities, load_model
    from mosmos.finetune.predict import InferenceModel, check_device, check_options, read_spec

    dev = check_device(device)
    autocast = check_options(overlap, sw_batch_size, precision, dev)
    spec = read_spec(model_dir)
    task_id = spec.task_index(task)
    ds, _ = _read_dataset(data, mapping or label_options(), vocabulary)
    organs = _scored_organs(ds, spec.organs, "the model", data)
    cases = _labelled_cases(ds, data)
    model, spec = load_model(model_dir, dev)
    runner = InferenceModel(model, mirror=tta, autocast=autocast)
    predictor = Predictor(runner, spec, dev, overlap=overlap, sw_batch_size=sw_batch_size)

    def prediction(case: Any) -> Any:
        return decode_probabilities(predictor.probabilities(case.image, task=task_id)[0], spec.strategy)

    rows = _score(ds, cases, spec.organs, organs, prediction, hd95)
    output = Path(output) if output else Path(model_dir) / f"eval_{ds.name}"
    record = {"model": str(model_dir), "data": str(data), "task": task}
    return _write(rows, output, record, organs, len(cases))


def prediction_labels(
    predictions: Path, ds: Any, vocab: Any, options: Any
) -> tuple[dict[int, str], list[str]]:
    """``(label id -> organ, organs in id order)`` of a prediction folder (see the module docstring)."""
    from mosmos.segdata.label_mapping import map_labels

    table, source = None, None
    if (predictions / "dataset.json").is_file():
        source = predictions / "dataset.json"
        raw = _read_json(source).get("labels")
        if not isinstance(raw, dict) or not all(isinstance(v, int) for v in raw.values()):
            raise ConfigError(
                f"{source}: 'labels' must map each label name to one integer id (regions are not supported)"
            )
        table = {int(v): str(k) for k, v in raw.items()}
    elif (predictions / "labels.json").is_file():
        source = predictions / "labels.json"
        raw = _read_json(source)
        try:
            table = {int(k): str(v) for k, v in raw.items()}
        except (AttributeError, ValueError):
            raise ConfigError(f"{source}: expected {{id: label name}}") from None
    if table is None:  # the dataset's own ids
        mapping = dict(ds.label_to_organ)
    else:
        foreground = {i: n for i, n in table.items() if i != 0}
        mapping, _ = map_labels(
            str(source),
            PREDICTIONS,
            foreground,
            vocab,
            options.label_map.get(PREDICTIONS),
            options.ignore_labels.get(PREDICTIONS),
        )
    organs = [mapping[i] for i in sorted(mapping)]
    return mapping, organs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _prediction_file(predictions: Path, case_id: str) -> Path | None:
    for name in (case_id, f"{case_id}_0000"):
        for suffix in (".nii.gz", ".nii"):
            if (predictions / (name + suffix)).is_file():
                return predictions / (name + suffix)
    return None


def evaluate_predictions(
    predictions: str | Path,
    data: str | Path,
    output: str | Path | None = None,
    vocabulary: str | None = None,
    mapping: Any = None,
    hd95: bool = True,
) -> dict:
    """Score the label maps in ``predictions`` (one ``<case id>.nii.gz`` per labelled case of ``data``,
    in the case's own geometry) as :func:`evaluate_run` scores a model; same outputs."""
    import numpy as np

    predictions = Path(predictions)
    if not predictions.is_dir():
        raise ConfigError(f"--predictions {predictions}: no such folder")
    options = mapping or label_options()
    ds, vocab = _read_dataset(data, options, vocabulary)
    mapping, predicted = prediction_labels(predictions, ds, vocab, options)
    organs = _scored_organs(ds, predicted, f"--predictions {predictions}", data)
    cases = _labelled_cases(ds, data)
    files = {c.case_id: _prediction_file(predictions, c.case_id) for c in cases}
    missing = [cid for cid, f in files.items() if f is None]
    if missing:
        raise DataError(
            f"--predictions {predictions}: no label map for {len(missing)} of {len(cases)} labelled case(s) "
            f"of {ds.name}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} (expected <case id>.nii.gz)"
        )
    lut = np.zeros(max(mapping, default=0) + 1, dtype=np.uint8)
    for label_id, organ in mapping.items():
        lut[label_id] = predicted.index(organ) + 1

    def prediction(case: Any) -> Any:
        import nibabel as nib

        path = files[case.case_id]
        try:
            raw = np.asarray(nib.load(str(path)).dataobj)
        except Exception as e:  # nibabel raises many types for unreadable files
            raise DataError(f"{path}: not a readable NIfTI label map: {e}") from None
        ids = np.rint(raw).astype(np.int64)
        if raw.ndim != 3 or ids.min() < 0 or ids.max() >= len(lut) or not np.array_equal(ids, raw):
            bad = sorted(set(np.unique(ids).tolist()) - set(range(len(lut))))[:5]
            raise DataError(
                f"{path}: a 3D map of the declared label ids is expected (shape {raw.shape}, unknown ids {bad})"
            )
        return lut[ids]

    rows = _score(ds, cases, predicted, organs, prediction, hd95)
    output = Path(output) if output else predictions / f"eval_{ds.name}"
    return _write(rows, output, {"predictions": str(predictions), "data": str(data)}, organs, len(cases))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mosmos evaluate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    run_from_args(args)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mosmos.finetune.predict import add_inference_arguments

    add_inference_arguments(parser, model_required=False, precision="float32")
    parser.add_argument(
        "--predictions", help="score this folder of label maps instead of a model (<case id>.nii.gz each)"
    )
    parser.add_argument("--data", required=True, help="dataset folder (nnU-Net / MSD) or datalist JSON")
    parser.add_argument(
        "--output",
        help="where metrics.json and cases.csv go (default: MODEL/eval_<dataset>, PREDICTIONS/eval_<dataset>)",
    )
    parser.add_argument("--vocabulary", help="organ vocabulary YAML (default: configs/organs.yaml)")
    parser.add_argument(
        "--config", help="a fine-tuning config (e.g. RUN/config.yaml) whose data.label_map etc. apply"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="label mapping as in fine-tuning: data.label_map.<dataset>.<label>=<organ>, "
        "data.ignore_labels.<dataset>=[<label>], data.labels.<dataset>={1: <name>}",
    )


def run_from_args(args: argparse.Namespace) -> dict:
    if (args.model is None) == (args.predictions is None):
        raise ConfigError("give exactly one of --model (score a model) and --predictions (score a folder)")
    options = label_options(args.config, args.overrides)
    if args.predictions is not None:
        return evaluate_predictions(
            args.predictions, args.data, args.output, args.vocabulary, mapping=options
        )
    return evaluate_run(
        args.model,
        args.data,
        args.output,
        task=args.task,
        vocabulary=args.vocabulary,
        device=args.device,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        mapping=options,
        tta=args.tta,
        precision=args.precision,
    )
