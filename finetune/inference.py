"""Trained segmenters on disk, and inference in each input's own geometry.

A stage 2 run directory holds ``model.safetensors`` (the best weights by mean validation Dice) and
``model.json``: the network, its encoder and attention head configs, the output organs, the tasks
with the organs each labels, the loss strategy, the preprocessing and the output-channel layout
(``output_channels``: ``organ``, or ``dataset_class`` with its ``channels``, see
:mod:`mosmos.finetune.channels`; a model.json without it is ``organ``). :func:`load_model` rebuilds
the network from the registry and loads the weights (safetensors only, no pickle).

Inference runs the preprocessing chain (RAS, spacing, HU window, body crop, pad), a sliding window
(``monai.inferers.sliding_window_inference``) over the whole volume, converts logits to per-organ
probabilities, and maps them back with ``monai.transforms.Invertd`` (undoing pad, crop, resampling
and reorientation), so probabilities and label maps have exactly the input's shape and affine.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mosmos.errors import ConfigError, DataError, root_cause
from mosmos.finetune.channels import OUTPUT_CHANNELS, merge_channels
from mosmos.io import atomic_path, atomic_write_bytes, write_json
from mosmos.transforms import BODY_MASK_KEY, PreprocessConfig, build_preprocess

logger = logging.getLogger("mosmos")

MODEL_FORMAT = "mosmos-segmenter-v1"
#: a weight of the convolutional MO-CTranS decoder (``mo_ctrans_conv``): one task token per stage
_PER_STAGE_TOKEN = re.compile(r"(^|\.)transformers\.\d+\.task_token\.")
MODEL_FILE = "model.safetensors"
SPEC_FILE = "model.json"


@dataclass
class ModelSpec:
    """What ``model.json`` holds."""

    name: str
    encoder: str
    encoder_kwargs: dict
    decoder: dict
    attention_head: dict | None
    organs: list[str]
    tasks: list[dict]  # [{"name": ..., "organs": [...]}]
    organ_task: dict[str, int]  # organ -> task used when no task is named
    strategy: str
    preprocess: dict
    extra: dict
    # "organ" (one channel per organ) or "dataset_class" (one per (task, organ): ``channels``);
    # model.json files from before the option hold neither key and read as "organ"
    output_channels: str = "organ"
    channels: list[dict] | None = None  # dataset_class: [{"task": name, "organ": organ}] per channel

    def __post_init__(self) -> None:
        if self.output_channels not in OUTPUT_CHANNELS:
            raise ValueError(
                f"output_channels={self.output_channels!r} is not one of {list(OUTPUT_CHANNELS)}"
            )
        if (self.output_channels == "dataset_class") != (self.channels is not None):
            raise ValueError("'channels' is required with output_channels=dataset_class, and only then")
        if self.channels is not None:
            names = self.task_names
            bad = [
                c for c in self.channels if c.get("task") not in names or c.get("organ") not in self.organs
            ]
            if bad:
                raise ValueError(f"channels {bad[:3]} name a task or organ the model does not have")

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    @property
    def channel_pairs(self) -> list[tuple[int, str]] | None:
        """The ``dataset_class`` layout as ``(task index, organ)`` per channel; None for ``organ``."""
        if self.channels is None:
            return None
        names = self.task_names
        return [(names.index(c["task"]), c["organ"]) for c in self.channels]

    @property
    def num_outputs(self) -> int:
        """The network's output channels."""
        return len(self.organs) if self.channels is None else len(self.channels)

    def to_dict(self) -> dict:
        return {
            "format": MODEL_FORMAT,
            "name": self.name,
            "encoder": self.encoder,
            "encoder_kwargs": self.encoder_kwargs,
            "decoder": self.decoder,
            "attention_head": self.attention_head,
            "organs": self.organs,
            "tasks": self.tasks,
            "organ_task": self.organ_task,
            "strategy": self.strategy,
            "preprocess": self.preprocess,
            "output_channels": self.output_channels,
            **({"channels": self.channels} if self.channels is not None else {}),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "model.json") -> ModelSpec:
        if d.get("format") != MODEL_FORMAT:
            raise ConfigError(f"{source}: not a mosmos segmentation model (format {d.get('format')!r})")
        known = {"format", *cls.__dataclass_fields__} - {"extra"}
        optional = ("output_channels", "channels")  # later additions, with defaults
        required = [k for k in cls.__dataclass_fields__ if k not in ("extra", *optional)]
        try:
            return cls(
                **{k: d[k] for k in required},
                **{k: d[k] for k in optional if k in d},
                extra={k: v for k, v in d.items() if k not in known},
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e}") from None
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None

    def task_index(self, task: str | None) -> int | None:
        """Index of a task by name (``None`` stays ``None``); an unknown name lists the valid ones."""
        if task is None:
            return None
        names = self.task_names
        if task not in names:
            raise ConfigError(f"task {task!r} is not one of this model's tasks: {names}")
        return names.index(task)


def build_from_spec(spec: ModelSpec) -> torch.nn.Module:
    """The network described by ``spec`` (random weights)."""
    from mosmos.models.registry import create_image_encoder, create_model
    from mosmos.models.tag_head import TagAttentionHead

    encoder = create_image_encoder(spec.encoder, **spec.encoder_kwargs)
    head = TagAttentionHead.from_config(spec.attention_head) if spec.attention_head else None
    decoder = {**spec.decoder, "num_classes": spec.num_outputs, "num_tasks": len(spec.tasks)}
    return create_model("segmenter", spec.name, encoder=encoder, attention_head=head, **decoder)


def legacy_spec(spec: ModelSpec, state: dict[str, torch.Tensor]) -> ModelSpec:
    """``spec`` with the network that wrote ``state``: run directories from before the paper's
    MO-CTranS decoder took the name ``mo_ctrans`` hold the convolutional decoder now registered as
    ``mo_ctrans_conv``. Its weights say so (a task token per stage, ``transformers.<k>.task_token``);
    the faithful decoder has one ``task_token`` at the top. Ensembles of it are renamed likewise."""
    if not any(_PER_STAGE_TOKEN.search(k) for k in state):
        return spec
    if spec.name == "mo_ctrans":
        return dataclasses.replace(spec, name="mo_ctrans_conv")
    if spec.name == "ensemble" and spec.decoder.get("member") == "mo_ctrans":
        return dataclasses.replace(spec, decoder={**spec.decoder, "member": "mo_ctrans_conv"})
    return spec


def save_model(run_dir: str | Path, model: torch.nn.Module, spec: ModelSpec) -> None:
    """Write ``model.safetensors`` and ``model.json`` atomically."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(run_dir / MODEL_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": MODEL_FORMAT})
    write_json(run_dir / SPEC_FILE, spec.to_dict())


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild a trained network from a stage 2 run directory (or its ``model.safetensors``)."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(run_dir)
    if path.is_file():
        path = path.parent
    weights, spec_path = path / MODEL_FILE, path / SPEC_FILE
    for f in (weights, spec_path):
        if not f.is_file():
            raise ConfigError(
                f"{path}: no {f.name}; --model must be a stage 2 run directory (from `mosmos finetune`) "
                "that finished at least one evaluation"
            )
    try:
        spec = ModelSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")), str(spec_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{spec_path}: not valid JSON: {e}") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{weights}: not a readable safetensors file: {e}") from None
    model = build_from_spec(legacy_spec(spec, state))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"{weights} does not match {spec_path}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(device).eval(), spec


def organ_probabilities(logits: torch.Tensor, strategy: str) -> torch.Tensor:
    """Per-organ probabilities from logits ``[B, C, *S]``: sigmoid (masked) or softmax with an
    implicit zero background logit (marginal)."""
    if strategy == "marginal":
        zeros = torch.zeros_like(logits[:, :1])
        return torch.softmax(torch.cat([zeros, logits], dim=1), dim=1)[:, 1:]
    return torch.sigmoid(logits)


def decode_probabilities(
    probs: np.ndarray | torch.Tensor, strategy: str, threshold: float = 0.5
) -> np.ndarray:
    """Label map (0 background, k = organ k-1) from probabilities ``[C, *S]``.

    masked: the most probable organ where its probability exceeds ``threshold``; marginal: the argmax
    over (background = 1 - sum of organs, organs).
    """
    p = torch.as_tensor(probs).float()
    if strategy == "marginal":
        background = (1.0 - p.sum(0, keepdim=True)).clamp_min(0)
        return torch.cat([background, p], 0).argmax(0).numpy().astype(np.uint8)
    best, idx = p.max(0)
    return torch.where(best > threshold, idx + 1, 0).numpy().astype(np.uint8)


class Predictor:
    """Sliding-window inference of a trained segmenter in each input's own geometry.

    :meth:`probabilities` runs :meth:`preprocess`, :meth:`window_probabilities` and :meth:`invert`.
    A task-conditioned model (``model.task_conditioned``; by default any model with several tasks)
    gets one pass per task whose organs are read from it, any other model a single pass.

    Args:
        model: the segmenter (``forward(x, task=None, mask=None)``), in eval mode.
        spec: its ``model.json``.
        device: where the network runs.
        overlap: sliding-window overlap (fraction of the window).
        sw_batch_size: windows per forward call.
        mode: blending of overlapping windows: ``"gaussian"`` (nnU-Net's, down-weights window
            borders) or ``"constant"`` (``monai.inferers.sliding_window_inference``'s default).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: ModelSpec,
        device: str | torch.device = "cpu",
        overlap: float = 0.25,
        sw_batch_size: int = 2,
        mode: str = "gaussian",
    ) -> None:
        if mode not in ("gaussian", "constant"):
            raise ConfigError(f"sliding-window mode {mode!r} is not one of ['gaussian', 'constant']")
        self.model, self.spec, self.device = model, spec, torch.device(device)
        self.pre = PreprocessConfig.from_dict(spec.preprocess)
        self.chain = build_preprocess(self.pre, ("image",))
        self.overlap, self.sw_batch_size, self.mode = overlap, sw_batch_size, mode
        self.task_conditioned = bool(getattr(model, "task_conditioned", len(spec.tasks) > 1))

    def _plan(self, task: int | None) -> dict[int | None, list[int]]:
        """Which forward passes to run: task -> network output channels taken from it. With
        ``dataset_class`` channels and no task, each task's channels come from its own pass."""
        if task is not None or not self.task_conditioned:
            return {task: list(range(self.spec.num_outputs))}
        plan: dict[int | None, list[int]] = {}
        pairs = self.spec.channel_pairs
        if pairs is not None:
            for k, (t, _) in enumerate(pairs):
                plan.setdefault(t, []).append(k)
            return plan
        for c, organ in enumerate(self.spec.organs):
            plan.setdefault(int(self.spec.organ_task[organ]), []).append(c)
        return plan

    def probabilities(self, image_path: str | Path, task: int | None = None) -> tuple[torch.Tensor, dict]:
        """Per-organ probabilities ``[C, *input shape]`` in the input's voxel grid, and its meta."""
        image, x = self.preprocess(image_path)
        probs = self.window_probabilities(x, task)
        return self.invert(image, probs), dict(image.meta)

    def preprocess(self, image_path: str | Path) -> tuple[Any, torch.Tensor]:
        """The preprocessed image (a MetaTensor that remembers its transforms) and the network
        input ``[1, 2, *S]`` (image, body mask) on the device."""
        try:
            item = self.chain({"image": str(image_path)})
        except Exception as exc:  # MONAI wraps reader errors several levels deep
            raise DataError(f"{image_path}: could not be read and preprocessed: {_root_cause(exc)}") from None
        image = item["image"]
        x = torch.cat([image.as_tensor(), torch.as_tensor(item[BODY_MASK_KEY]).float()], 0)[None]
        return image, x.to(self.device)

    def window_probabilities(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Per-organ probabilities ``[C, *S]`` (on the CPU) of the preprocessed input ``x``: the
        sliding window's blended logits of each pass, each channel's probability from its pass;
        ``dataset_class`` channels then merged into organs
        (:func:`~mosmos.finetune.channels.merge_channels`, ``task``'s own channels first)."""
        from monai.inferers import sliding_window_inference

        out = torch.zeros((self.spec.num_outputs, *x.shape[2:]), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for t, channels in self._plan(task).items():
                tid = None if t is None else torch.tensor([t], device=self.device)

                def predictor(window: torch.Tensor, tid=tid) -> torch.Tensor:
                    task_ids = None if tid is None else tid.expand(window.shape[0])
                    return self.model(window[:, :1], task=task_ids, mask=window[:, 1:2])

                logits = sliding_window_inference(
                    x,
                    roi_size=tuple(self.pre.size),
                    sw_batch_size=self.sw_batch_size,
                    predictor=predictor,
                    overlap=self.overlap,
                    mode=self.mode,
                )
                probs = organ_probabilities(torch.as_tensor(logits).float(), self.spec.strategy)[0]
                out[channels] = probs[channels]
        pairs = self.spec.channel_pairs
        if pairs is not None:
            out = merge_channels(out, pairs, self.spec.organs, task)
        return out.cpu()  # one copy from the device, after every pass

    def invert(self, image: Any, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` ``[C, *S]`` mapped back to the input's grid (pad, crop, resampling and
        orientation undone) with the transforms ``image`` recorded."""
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        pred = MetaTensor(probs, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        inverted = Invertd("pred", self.chain, orig_keys="image", nearest_interp=False)(
            {"image": image, "pred": pred}
        )["pred"]
        return torch.as_tensor(inverted).float()


def _root_cause(exc: BaseException) -> str:
    exc = root_cause(exc)
    return f"{type(exc).__name__}: {exc}"


def save_label_map(label: np.ndarray, reference: str | Path, path: str | Path) -> None:
    """Write a uint8 label map with the reference volume's affine and header, atomically."""
    import nibabel as nib

    ref = nib.load(str(reference))
    if tuple(label.shape) != tuple(ref.shape[:3]):
        raise DataError(f"{path}: prediction shape {label.shape} differs from {reference} {ref.shape[:3]}")
    img = nib.Nifti1Image(label.astype(np.uint8), ref.affine, header=ref.header.copy())
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    _write_nifti(img, path)


def save_probabilities(probs: np.ndarray, reference: str | Path, path: str | Path) -> None:
    """Write float32 probabilities ``[C, *S]`` as a 4D NIfTI (channels last) with the reference affine."""
    import nibabel as nib

    ref = nib.load(str(reference))
    img = nib.Nifti1Image(np.moveaxis(probs.astype(np.float32), 0, -1), ref.affine)
    _write_nifti(img, path)


def _write_nifti(img, path: str | Path) -> None:
    """Save a NIfTI image atomically (a killed run leaves no half-written file); gzip for ``.gz``."""
    import gzip

    data = img.to_bytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write_bytes(path, data)


def labels_json(organs: list[str]) -> dict[str, Any]:
    """``labels.json`` beside predictions: id -> organ name, background 0."""
    return {"0": "background", **{str(i + 1): o for i, o in enumerate(organs)}}
