"""``mosmos predict --model RUN --input FILE_OR_DIR --output DIR [--task NAME] [--probabilities]``.

One uint8 label map per input volume, with exactly the input's shape and affine (ids are the model's
organs in order, written to ``labels.json`` beside them), optionally per-organ probabilities. Every
file is written atomically, so a killed run leaves no half-written NIfTI, and nothing is written
outside ``--output``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mosmos.errors import ConfigError, DataError
from mosmos.io import write_json

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    # nnU-Net channel suffix: CASE_0000 -> CASE
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]
    return name


def list_inputs(input_path: str | Path) -> list[Path]:
    """NIfTI files named by ``input_path`` (a file, or a folder searched non-recursively)."""
    path = Path(input_path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    else:
        raise ConfigError(f"--input {input_path}: no such file or folder")
    files = [f for f in files if f.name.endswith(NIFTI_SUFFIXES)]
    if not files:
        raise ConfigError(f"--input {input_path}: no .nii or .nii.gz volumes found")
    return files


def safe_output_path(output: Path, name: str) -> Path:
    """``output / name``, refusing names that would escape ``output`` (``../``, absolute paths)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("~"):
        raise ConfigError(f"refusing case id {name!r}: it would write outside --output {output}")
    target = (output / name).resolve()
    if target.parent != output.resolve():
        raise ConfigError(f"refusing case id {name!r}: it would write outside --output {output}")
    return target


def predict(
    model_dir: str | Path,
    input_path: str | Path,
    output: str | Path,
    task: str | None = None,
    probabilities: bool = False,
    device: str | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 2,
) -> list[Path]:
    """Predict every input volume; returns the label-map paths written."""
    import torch
    from tqdm.auto import tqdm

    from mosmos.finetune.inference import (
        Predictor,
        decode_probabilities,
        labels_json,
        load_model,
        save_label_map,
        save_probabilities,
    )

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, spec = load_model(model_dir, device)
    task_id = spec.task_index(task)  # an unknown task fails before any work
    files = list_inputs(input_path)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    targets = [safe_output_path(output, _case_name(f) + ".nii.gz") for f in files]
    if len(set(targets)) < len(targets):
        raise ConfigError(f"--input {input_path}: two inputs map to the same case name; rename one")
    # headers of every input first: a wrong file fails before any prediction, all of them named
    from mosmos.check.startup import raise_for_problems
    from mosmos.check.volumes import inspect_volume

    header_problems = [p for f in files for p in inspect_volume(str(f), "image", deep=False, case=f.name)[1]]
    raise_for_problems(header_problems, f"--input {input_path}", hint="fix or remove these inputs")
    write_json(output / "labels.json", labels_json(spec.organs))
    predictor = Predictor(model, spec, device, overlap=overlap, sw_batch_size=sw_batch_size)
    written, failed = [], []
    for src, dst in tqdm(list(zip(files, targets, strict=True)), desc="predict", dynamic_ncols=True):
        try:
            probs, _ = predictor.probabilities(src, task=task_id)
        except Exception as e:  # a volume whose voxels do not read (truncated ...): the others go on
            failed.append(f"{src}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        save_label_map(decode_probabilities(probs, spec.strategy), src, dst)
        if probabilities:
            save_probabilities(
                probs.numpy(), src, dst.with_name(dst.name.replace(".nii.gz", "_probs.nii.gz"))
            )
        written.append(dst)
    print(f"wrote {len(written)} label map(s) to {output} (ids in {output}/labels.json)")
    if failed:
        raise DataError(
            f"{len(failed)} of {len(files)} input(s) could not be predicted (the other label maps are written):\n  "
            + "\n  ".join(failed)
        )
    return written


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``mosmos evaluate`` and ``mosmos predict`` share."""
    parser.add_argument("-m", "--model", required=True, help="stage 2 run directory")
    parser.add_argument(
        "--task", help="condition every organ on this task (default: per organ, a task that labels it)"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_inference_arguments(parser)
    parser.add_argument("-i", "--input", required=True, help="a NIfTI volume or a folder of them")
    parser.add_argument("-o", "--output", required=True, help="folder for the label maps")
    parser.add_argument("--probabilities", action="store_true", help="also write per-organ probabilities")


def run_from_args(args: argparse.Namespace) -> list[Path]:
    return predict(
        args.model,
        args.input,
        args.output,
        task=args.task,
        probabilities=args.probabilities,
        device=args.device,
        overlap=args.overlap,
    )
