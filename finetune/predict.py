"""``mosmos predict -m RUN -i FILE_OR_DIR -o DIR [--task NAME] [--organs A,B] [--probabilities]``.

One uint8 label map per input volume, under the input's own name and with exactly its shape and
affine. The nnU-Net channel suffix ``_0000`` is dropped only when every input carries it (an nnU-Net
raw ``imagesTs`` folder); any other name (``patient_0001.nii.gz``, ``a.b.nii``) is kept as it is.
Beside the label maps: ``dataset.json`` with nnU-Net's ``labels`` table (``{name: id}``) and
``labels.json`` (``{id: name}``); with ``--probabilities`` one ``<case>.npz`` per input holding
``probabilities`` (float16, ``[organ, *input shape]``, compressed) and ``organs``. Every option is
checked before the model loads and every input's header before any prediction; every file is written
atomically, so a killed run leaves no half-written file and ``--continue`` picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mosmos.errors import ConfigError, DataError
from mosmos.io import atomic_path, write_json

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CHANNEL_SUFFIX = "_0000"  # nnU-Net's suffix of a single-channel input
PRECISIONS = ("auto", "float32", "float16", "bfloat16")


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def case_names(files: list[Path]) -> list[tuple[str, str]]:
    """``(case name, suffix)`` of each input: its file name without ``.nii``/``.nii.gz``, and without
    ``_0000`` when every input ends so (as nnU-Net raw image folders name single-channel cases)."""
    split = [_split_suffix(f.name) for f in files]
    if all(stem.endswith(CHANNEL_SUFFIX) and len(stem) > len(CHANNEL_SUFFIX) for stem, _ in split):
        split = [(stem[: -len(CHANNEL_SUFFIX)], suffix) for stem, suffix in split]
    return split


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


def check_device(device: str | None) -> Any:
    """The ``torch.device`` of ``--device`` (default: cuda when available), or a one-line error."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "CPU-only build" if torch.version.cuda is None else "build without a usable GPU"
            raise ConfigError(
                f"--device {device}: this PyTorch ({torch.__version__}, {build}) has no CUDA; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device}: unsupported device type {dev.type!r}; use cpu or cuda")
    return dev


def check_options(overlap: float, sw_batch_size: int, precision: str, device: Any) -> Any:
    """Check the sliding-window options; returns the autocast dtype (None: float32)."""
    import torch

    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"--overlap {overlap}: must be in [0, 1) (a fraction of the window)")
    if sw_batch_size < 1:
        raise ConfigError(f"--sw-batch-size {sw_batch_size}: must be at least 1")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: valid are {list(PRECISIONS)}")
    if precision == "auto":  # half precision on a GPU, as nnU-Net's predictor does
        return torch.float16 if device.type == "cuda" else None
    if precision != "float32" and device.type != "cuda":
        raise ConfigError(
            f"--precision {precision}: half precision needs a CUDA device (--device is {device})"
        )
    return {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[precision]


def read_spec(model_dir: str | Path) -> Any:
    """The ``model.json`` of a stage 2 run or export, read without building the network."""
    from mosmos.finetune.inference import SPEC_FILE, ModelSpec

    path = Path(model_dir)
    spec_path = (path.parent if path.is_file() else path) / SPEC_FILE
    if not spec_path.is_file():
        raise ConfigError(
            f"{model_dir}: no {SPEC_FILE}; --model must be a stage 2 run directory (from `mosmos finetune`) "
            "or its `mosmos export`"
        )
    try:
        return ModelSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")), str(spec_path))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{spec_path}: not valid JSON: {e}") from None


def check_organs(organs: str | list[str] | None, spec: Any) -> list[str] | None:
    """``--organs`` (comma-separated or a list) checked against the model's organs."""
    if organs is None:
        return None
    names = [o.strip() for o in organs.split(",")] if isinstance(organs, str) else list(organs)
    names = [o for o in names if o]
    unknown = [o for o in names if o not in spec.organs]
    if unknown or not names:
        raise ConfigError(f"--organs: {unknown or 'none given'} not among the model's organs {spec.organs}")
    return names


class InferenceModel:
    """The network as the sliding window calls it, with mirroring test-time augmentation (the mean
    of the logits over every combination of flipped spatial axes, as nnU-Net mirrors) and autocast.

    Attributes the :class:`~mosmos.finetune.inference.Predictor` reads (``task_conditioned``) are
    the network's own."""

    def __init__(self, model: Any, mirror: bool = False, autocast: Any = None) -> None:
        self.model, self.mirror, self.autocast = model, mirror, autocast
        if hasattr(model, "task_conditioned"):
            self.task_conditioned = model.task_conditioned

    def _forward(self, x: Any, task: Any, mask: Any) -> Any:
        import torch

        if self.autocast is None:
            return self.model(x, task=task, mask=mask)
        with torch.autocast(x.device.type, dtype=self.autocast):
            return self.model(x, task=task, mask=mask).float()

    def __call__(self, x: Any, task: Any = None, mask: Any = None) -> Any:
        import itertools

        import torch

        out = self._forward(x, task, mask)
        if not self.mirror:
            return out
        axes = list(range(2, x.ndim))
        flips = [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
        for dims in flips:
            m = None if mask is None else torch.flip(mask, dims)
            out = out + torch.flip(self._forward(torch.flip(x, dims), task, m), dims)
        return out / (len(flips) + 1)


def nnunet_labels(organs: list[str]) -> dict[str, Any]:
    """``dataset.json`` beside predictions: nnU-Net's ``labels`` ``{name: id}`` (background 0)."""
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{o: i + 1 for i, o in enumerate(organs)}},
        "file_ending": ".nii.gz",
        "description": "label ids of mosmos predictions (each organ keeps its id under --organs)",
    }


def save_probabilities(probs: Any, organs: list[str], path: Path) -> None:
    """``probabilities`` (float16 ``[organ, *S]``) and ``organs`` into a compressed ``.npz``, atomically."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, probabilities=np.asarray(probs, dtype=np.float16), organs=np.array(organs))


def predict(
    model_dir: str | Path,
    input_path: str | Path,
    output: str | Path,
    task: str | None = None,
    probabilities: bool = False,
    device: str | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    tta: bool = False,
    resume: bool = False,
    organs: str | list[str] | None = None,
    precision: str = "auto",
) -> list[Path]:
    """Predict every input volume; returns the label-map paths written (or, with ``resume``, kept).

    Args:
        model_dir: a stage 2 run directory or its export.
        input_path: a NIfTI volume or a folder of them.
        output: the folder for label maps, ``dataset.json``, ``labels.json`` and probabilities.
        task: condition every organ on this task (default: per organ, a task that labels it); a
            ``dataset_class`` model takes the organs that task labels from its own channels.
        probabilities: also write ``<case>.npz`` (float16 probabilities of the written organs).
        device: ``cpu``, ``cuda``, ``cuda:N`` (default: cuda when available).
        overlap, sw_batch_size: sliding-window overlap and windows per forward pass.
        tta: mirroring test-time augmentation (8 passes per window in 3D).
        resume: skip cases whose outputs exist (``--continue``).
        organs: write only these organs (each keeps its id).
        precision: ``auto`` (float16 on CUDA), ``float32``, ``float16``, ``bfloat16``.
    """
    # every option, the spec and the inputs' names first: nothing loads before they are right
    dev = check_device(device)
    autocast = check_options(overlap, sw_batch_size, precision, dev)
    spec = read_spec(model_dir)
    task_id = spec.task_index(task)
    subset = check_organs(organs, spec)
    files = list_inputs(input_path)
    output = Path(output)
    names = case_names(files)
    targets = [safe_output_path(output, name + (suffix or ".nii.gz")) for name, suffix in names]
    prob_paths = [safe_output_path(output, name + ".npz") for name, _ in names]
    seen: dict[str, Path] = {}
    for f, (name, _) in zip(files, names, strict=True):
        if name in seen:
            raise ConfigError(
                f"--input {input_path}: {seen[name].name} and {f.name} are both case {name!r}; rename one"
            )
        seen[name] = f
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a folder")
    # headers of every input next: a wrong file fails before any prediction, all of them named
    from mosmos.check.startup import raise_for_problems
    from mosmos.check.volumes import inspect_volume

    header_problems = [p for f in files for p in inspect_volume(str(f), "image", deep=False, case=f.name)[1]]
    raise_for_problems(header_problems, f"--input {input_path}", hint="fix or remove these inputs")

    import numpy as np
    from tqdm.auto import tqdm

    from mosmos.finetune.inference import (
        Predictor,
        decode_probabilities,
        labels_json,
        load_model,
        save_label_map,
    )

    jobs = list(zip(files, targets, prob_paths, strict=True))
    if resume:
        jobs = [j for j in jobs if not (j[1].is_file() and (not probabilities or j[2].is_file()))]
    output.mkdir(parents=True, exist_ok=True)
    written = [t for t in targets if t not in {j[1] for j in jobs}]
    if written:
        print(f"--continue: {len(written)} of {len(files)} case(s) already predicted in {output}")
    kept = spec.organs if subset is None else [o for o in spec.organs if o in subset]
    write_json(
        output / "dataset.json", nnunet_labels(spec.organs) if subset is None else _subset_labels(spec, kept)
    )
    write_json(output / "labels.json", labels_json(spec.organs))
    if not jobs:
        return written
    model, spec = load_model(model_dir, dev)
    channels = [spec.organs.index(o) for o in kept]
    runner = InferenceModel(model, mirror=tta, autocast=autocast)
    predictor = Predictor(runner, spec, dev, overlap=overlap, sw_batch_size=sw_batch_size)
    failed = []
    for src, dst, npz in tqdm(jobs, desc="predict", dynamic_ncols=True):
        try:
            probs, _ = predictor.probabilities(src, task=task_id)
        except Exception as e:  # a volume whose voxels do not read (truncated ...): the others go on
            failed.append(f"{src}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        label = decode_probabilities(probs, spec.strategy)
        if subset is not None:  # the full decision, then the other organs dropped: ids stay the model's
            label = np.where(np.isin(label, [c + 1 for c in channels]), label, 0).astype(np.uint8)
        if probabilities:
            save_probabilities(probs.numpy()[channels], kept, npz)
        save_label_map(label, src, dst)  # last: its presence marks a finished case for --continue
        written.append(dst)
    print(f"wrote {len(written)} label map(s) to {output} (ids in {output}/dataset.json)")
    if failed:
        raise DataError(
            f"{len(failed)} of {len(files)} input(s) could not be predicted (the other label maps are written):\n  "
            + "\n  ".join(failed)
        )
    return written


def _subset_labels(spec: Any, kept: list[str]) -> dict[str, Any]:
    table = nnunet_labels(spec.organs)
    table["labels"] = {"background": 0, **{o: spec.organs.index(o) + 1 for o in kept}}
    return table


def add_inference_arguments(
    parser: argparse.ArgumentParser, model_required: bool = True, precision: str = "auto"
) -> None:
    """The options ``mosmos evaluate`` and ``mosmos predict`` share (``precision``: its default)."""
    parser.add_argument(
        "-m", "--model", required=model_required, help="stage 2 run directory (or its `mosmos export`)"
    )
    parser.add_argument(
        "--task",
        help="condition every organ on this task (default: per organ, a task that labels it); a "
        "dataset_class model takes the organs that task labels from its own channels",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass (default: 2)")
    parser.add_argument(
        "--tta", action="store_true", help="mirroring test-time augmentation (8x slower in 3D)"
    )
    parser.add_argument(
        "--precision",
        default=precision,
        choices=PRECISIONS,
        help=f"auto: float16 autocast on CUDA, float32 on CPU (default: {precision})",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_inference_arguments(parser)
    parser.add_argument("-i", "--input", required=True, help="a NIfTI volume or a folder of them")
    parser.add_argument("-o", "--output", required=True, help="folder for the label maps")
    parser.add_argument(
        "--probabilities",
        action="store_true",
        help="also write <case>.npz: float16 probabilities, compressed",
    )
    parser.add_argument(
        "--organs", help="comma-separated organs to write (each keeps its id; default: every organ)"
    )
    parser.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="skip cases whose label map (and probabilities) already exist in --output",
    )


def run_from_args(args: argparse.Namespace) -> list[Path]:
    return predict(
        args.model,
        args.input,
        args.output,
        task=args.task,
        probabilities=args.probabilities,
        device=args.device,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        tta=args.tta,
        resume=args.resume,
        organs=args.organs,
        precision=args.precision,
    )
