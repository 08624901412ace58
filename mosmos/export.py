"""The stage 1 -> stage 2 contract: the encoder export, written and read here only.

An export is a folder with ``encoder.safetensors`` (each part's tensors under its prefix in
:data:`PREFIXES`: image encoder, pixel-tag attention head, joint-space projections) and
``encoder.json`` (an :class:`EncoderExport`: how to rebuild each part, the input preprocessing, the
organ tags, the text tower, the full stage 1 objective and the commit), written after the weights
so that its presence marks a complete export. Stage 1 and the benchmark write exports with
:func:`write_encoder_export`; stage 2 and users read them with :func:`read_encoder_export` or
:func:`load_encoder`. ``mosmos-encoder-v1`` exports (before the objective, projections, text tower
and commit were recorded) are still read.

The file names and records are defined in :mod:`mosmos.export_format` and the writing is in
:mod:`mosmos.export_write`; this module reads and loads exports and re-exports both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from mosmos.errors import ConfigError
from mosmos.export_format import (
    ENCODER_JSON,
    ENCODER_WEIGHTS,
    EXPORT_FORMAT,
    PREFIXES,
    PRETRAINED_CONFIG,
    PRETRAINED_WEIGHTS,
    EncoderExport,
    Preprocessing,
)
from mosmos.export_write import source_commit, write_encoder_export
from mosmos.models.encoders.base import ImageEncoder
from mosmos.models.pretrain_model import ProjectionHead
from mosmos.models.tag_head import TagAttentionHead

__all__ = [
    "ENCODER_JSON",
    "ENCODER_WEIGHTS",
    "EXPORT_FORMAT",
    "PREFIXES",
    "PRETRAINED_CONFIG",
    "PRETRAINED_WEIGHTS",
    "EncoderExport",
    "LoadedEncoder",
    "Preprocessing",
    "build_tag_head",
    "export_paths",
    "load_encoder",
    "read_encoder_export",
    "source_commit",
    "write_encoder_export",
]

_V1_FORMAT = "mosmos-encoder-v1"  # before the objective, projections, text tower and commit were recorded
#: What a v1 encoder.json could hold (only architecture and encoder_kwargs were required).
_V1_KEYS = {"architecture", "encoder_kwargs", "feature_channels", "feature_strides", "preprocess"}
_V1_KEYS |= {"organs", "tag_attention", "objective"}


class LoadedEncoder(NamedTuple):
    """What :func:`load_encoder` returns; every module is on the requested device, in eval mode."""

    encoder: ImageEncoder  # weights loaded
    tag_head: TagAttentionHead | None  # weights loaded; None when stage 1 had no tag branch
    preprocess: Preprocessing | None  # how inputs must be prepared
    projections: dict[str, ProjectionHead]  # "image" / "text" joint-space heads (empty without text)
    export: EncoderExport  # everything else encoder.json records (organs, objective, commit, ...)


def export_paths(path: str | Path) -> tuple[Path, Path]:
    """``(encoder.json, encoder.safetensors)`` of an export folder, or of either file's folder;
    ``(config.json, model.safetensors)`` of a ``mosmos export`` folder of a stage 1 run."""
    path = Path(path)
    if path.is_dir():
        if not (path / ENCODER_JSON).exists() and (path / PRETRAINED_CONFIG).is_file():
            return path / PRETRAINED_CONFIG, path / PRETRAINED_WEIGHTS
        return path / ENCODER_JSON, path / ENCODER_WEIGHTS
    if path.suffix == ".safetensors":
        return path.parent / ENCODER_JSON, path
    if path.suffix == ".json":
        return path, path.parent / ENCODER_WEIGHTS
    if not path.exists():
        raise ConfigError(f"encoder export {path} does not exist (expected a folder or a .safetensors file)")
    raise ConfigError(
        f"encoder export {path} is neither a folder nor a .safetensors file "
        f"(expected {ENCODER_JSON} + {ENCODER_WEIGHTS})"
    )


def _parse(data: Any, json_path: Path) -> EncoderExport:
    if not isinstance(data, dict):
        raise ConfigError(f"{json_path}: expected a JSON object, found {type(data).__name__}")
    found = data.get("format")
    if found not in (EXPORT_FORMAT, _V1_FORMAT):
        raise ConfigError(
            f"{json_path}: format is {found!r}, expected {EXPORT_FORMAT!r} (or the older {_V1_FORMAT!r}); "
            "export it again with this version of mosmos"
        )
    for key, kind in (("architecture", str), ("encoder_kwargs", dict)):
        if not isinstance(data.get(key), kind):
            raise ConfigError(f"{json_path}: missing or invalid {key!r} (expected a {kind.__name__})")
    if found == _V1_FORMAT:  # only the architecture was required then
        data = {**{k: data[k] for k in data if k in _V1_KEYS}, "format": _V1_FORMAT}
    else:
        names = {f.name for f in fields(EncoderExport)}
        keys = {"missing": sorted(names - set(data)), "unknown": sorted(set(data) - names)}
        problems = [f"{label} keys {found}" for label, found in keys.items() if found]
        if problems:
            raise ConfigError(
                f"{json_path}: {'; '.join(problems)} (a {EXPORT_FORMAT} one has {sorted(names)})"
            )
    try:
        pre = data.get("preprocess")
        data["preprocess"] = None if pre is None else Preprocessing(**pre)
        return EncoderExport(**data)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{json_path}: invalid content: {err}") from None


def _check_parts(meta: EncoderExport, tensors: Mapping[str, torch.Tensor], tensor_path: Path) -> None:
    """Every part encoder.json describes has tensors, and every tensor belongs to a known part."""
    parts = ["encoder", *["tag_attention"] * (meta.tag_attention is not None)]
    parts += [f"{side}_projection" for side in meta.projections]
    problems = [
        f"no {PREFIXES[part]}* tensors for the {part} it describes"
        for part in parts
        if not any(k.startswith(PREFIXES[part]) for k in tensors)
    ]
    stray = sorted(k for k in tensors if not k.startswith(tuple(PREFIXES.values())))
    if stray:
        problems.append(f"tensors of no known part: {stray[:5]}")
    if problems:
        raise ConfigError(f"{tensor_path}: the weights do not match {ENCODER_JSON}: " + "; ".join(problems))


def read_encoder_export(path: str | Path) -> tuple[EncoderExport, dict[str, torch.Tensor]]:
    """Read an encoder export.

    Args:
        path: an export folder (e.g. a stage 1 run directory), or its ``encoder.safetensors``
            (``encoder.json`` beside it).

    Returns:
        ``(meta, tensors)``: what ``encoder.json`` holds, and every tensor of the weights (CPU).

    Raises:
        ConfigError: naming the file and the problem: a missing file, invalid JSON, another
            format version, missing or unknown keys, or weights that do not match the json.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    json_path, tensor_path = export_paths(path)
    for p in (json_path, tensor_path):
        if not p.is_file():
            raise ConfigError(
                f"encoder export {path}: missing {p.name} (looked for {p}); an export folder holds "
                f"{ENCODER_JSON} and {ENCODER_WEIGHTS}"
            )
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {json_path}: {err}") from None
    if json_path.name == PRETRAINED_CONFIG:  # a `mosmos export` folder: the encoder record inside
        if not isinstance(data, dict) or not isinstance(data.get("encoder"), dict):
            kind = data.get("kind") if isinstance(data, dict) else None
            raise ConfigError(
                f"{json_path}: not the export of a stage 1 run (kind {kind!r}, no 'encoder' record)"
            )
        data = data["encoder"]
    meta = _parse(data, json_path)
    try:
        tensors = load_file(str(tensor_path))
    except (OSError, SafetensorError) as err:
        raise ConfigError(f"cannot read {tensor_path}: {err}") from None
    _check_parts(meta, tensors, tensor_path)
    return meta, tensors


def build_tag_head(meta: EncoderExport, source: str | Path) -> TagAttentionHead | None:
    """The tag head ``meta`` describes (fresh weights), or None when it has none."""
    if meta.tag_attention is None:
        return None
    try:
        return TagAttentionHead.from_config(meta.tag_attention)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{source}: cannot rebuild the tag attention head from {ENCODER_JSON}: {err}"
        ) from None


def _load_part(module: nn.Module, tensors: Mapping[str, torch.Tensor], part: str, source: Path) -> None:
    """Copy the ``part`` tensors into ``module``; every key and shape must match."""
    prefix = PREFIXES[part]
    given = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    want = module.state_dict()
    problems = [f"missing {k}" for k in want if k not in given]
    problems += [f"unexpected {k}" for k in given if k not in want]
    problems += [
        f"{k}: file {list(v.shape)} vs model {list(want[k].shape)}"
        for k, v in given.items()
        if k in want and v.shape != want[k].shape
    ]
    if problems:
        raise ConfigError(
            f"{source}: the {prefix}* weights do not fit the {part} {ENCODER_JSON} describes "
            f"({len(problems)} problems, at most 10 shown):\n  " + "\n  ".join(problems[:10])
        )
    module.load_state_dict(given)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> LoadedEncoder:
    """Rebuild an exported encoder, its tag head and projections, with their weights.

    Args:
        path: an export folder (a stage 1 run directory) or its ``encoder.safetensors``.
        device: where the modules go.

    Returns:
        A :class:`LoadedEncoder` (modules in eval mode).

    Raises:
        ConfigError: an unreadable or inconsistent export (see :func:`read_encoder_export`), or
            weights that do not fit the modules it describes.

    Example::

        enc = mosmos.load_encoder("runs/pretrain")
        out = enc.encoder(torch.zeros(1, 1, *enc.preprocess.size))  # {"features": [...], "pooled": ...}
        logits, maps = enc.tag_head(out["features"])  # one map per organ in enc.export.organs
    """
    from mosmos.models.registry import create_image_encoder

    meta, tensors = read_encoder_export(path)
    json_path, tensor_path = export_paths(path)
    try:
        encoder = create_image_encoder(meta.architecture, **meta.encoder_kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{json_path}: cannot build image encoder {meta.architecture!r}: {err}") from None
    tag_head = build_tag_head(meta, json_path)
    projections = {side: ProjectionHead(d["in_dim"], d["out_dim"]) for side, d in meta.projections.items()}
    parts = {"encoder": encoder, "tag_attention": tag_head}
    parts.update({f"{side}_projection": head for side, head in projections.items()})
    for part, module in parts.items():
        if module is not None:
            _load_part(module, tensors, part, tensor_path)
            module.to(device).eval()
    return LoadedEncoder(encoder, tag_head, meta.preprocess, projections, meta)
