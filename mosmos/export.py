"""The stage 1 -> stage 2 contract: the encoder export, written and read here only.

An export is a folder with ``encoder.safetensors`` (each part's tensors under its prefix in
:data:`PREFIXES`: image encoder, pixel-tag attention head, joint-space projections) and
``encoder.json`` (an :class:`EncoderExport`: how to rebuild each part, the input preprocessing, the
organ tags, the text tower, the full stage 1 objective and the commit), written after the weights
so that its presence marks a complete export. Stage 1 and the benchmark write exports with
:func:`write_encoder_export`; stage 2 and users read them with :func:`read_encoder_export` or
:func:`load_encoder`. ``mosmos-encoder-v1`` exports (before the objective, projections, text tower
and commit were recorded) are still read.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from mosmos.errors import ConfigError
from mosmos.io import atomic_path, atomic_write_text
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

EXPORT_FORMAT = "mosmos-encoder-v2"
_V1_FORMAT = "mosmos-encoder-v1"  # before the objective, projections, text tower and commit were recorded
ENCODER_JSON = "encoder.json"
ENCODER_WEIGHTS = "encoder.safetensors"
#: What ``mosmos export`` writes (Hugging Face's names): the record of :mod:`mosmos.api`, whose
#: ``encoder`` entry is an ``encoder.json``, and the weights, named as in ``encoder.safetensors``.
PRETRAINED_CONFIG = "config.json"
PRETRAINED_WEIGHTS = "model.safetensors"
#: Tensor-name prefix of each part in ``encoder.safetensors``.
PREFIXES = {part: f"{part}." for part in ("encoder", "tag_attention", "image_projection", "text_projection")}
_PROJECTIONS = ("image", "text")
#: What a v1 encoder.json could hold (only architecture and encoder_kwargs were required).
_V1_KEYS = {"architecture", "encoder_kwargs", "feature_channels", "feature_strides", "preprocess"}
_V1_KEYS |= {"organs", "tag_attention", "objective"}


@dataclass
class Preprocessing:
    """How the encoder's inputs were prepared (``mosmos.transforms`` does the same in both stages)."""

    spacing: list[float]  # voxel size in mm, RAS axis order
    size: list[int]  # network input in voxels
    hu_window: list[float]  # HU mapped linearly onto intensity_range, values outside clipped
    body_threshold_hu: float  # raw HU above this is body (the mask pooling and attention use)
    intensity_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    orientation: str = "RAS"

    def __post_init__(self) -> None:
        self.spacing = [float(v) for v in self.spacing]
        self.size = [int(v) for v in self.size]
        self.hu_window = [float(v) for v in self.hu_window]
        self.intensity_range = [float(v) for v in self.intensity_range]
        self.body_threshold_hu = float(self.body_threshold_hu)
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"preprocess.spacing={self.spacing} must be three positive numbers (mm)")
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"preprocess.size={self.size} must be three positive integers")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            raise ValueError(f"preprocess.hu_window={self.hu_window} must be [low, high] with low < high")
        if self.intensity_range != [0.0, 1.0]:
            raise ValueError(f"preprocess.intensity_range={self.intensity_range}: only [0, 1] is supported")

    def to_config(self, **overrides: Any) -> Any:
        """The :class:`mosmos.transforms.PreprocessConfig` of these settings (``overrides`` win)."""
        from mosmos.transforms import PreprocessConfig

        keys = ("spacing", "size", "hu_window", "body_threshold_hu")
        return PreprocessConfig(**{**{k: getattr(self, k) for k in keys}, **overrides})


@dataclass
class EncoderExport:
    """What ``encoder.json`` holds (its keys are these fields)."""

    architecture: str  # image encoder registry name (see `mosmos models`)
    encoder_kwargs: dict[str, Any]  # its constructor kwargs
    feature_channels: list[int] = field(default_factory=list)  # of its feature maps, high resolution first
    feature_strides: list[int] = field(default_factory=list)  # their strides relative to the input
    preprocess: Preprocessing | None = None  # None only in v1 exports that did not record it
    organs: list[str] = field(default_factory=list)  # tag order of the tag head
    tag_attention: dict[str, Any] | None = None  # TagAttentionHead.head_config() (None: no tag head)
    projections: dict[str, dict[str, int]] = field(default_factory=dict)  # image/text -> in_dim, out_dim
    temperature: float | None = None  # learned contrastive temperature (None: no text side)
    text: dict[str, Any] | None = None  # text tower: name, pooling, folder (relative to the export)...
    objective: dict[str, Any] = field(default_factory=dict)  # every loss weight and gradient setting
    commit: str = ""  # the mosmos commit (or version) that trained it
    format: str = EXPORT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (what ``encoder.json`` holds)."""
        return asdict(self)


class LoadedEncoder(NamedTuple):
    """What :func:`load_encoder` returns; every module is on the requested device, in eval mode."""

    encoder: ImageEncoder  # weights loaded
    tag_head: TagAttentionHead | None  # weights loaded; None when stage 1 had no tag branch
    preprocess: Preprocessing | None  # how inputs must be prepared
    projections: dict[str, ProjectionHead]  # "image" / "text" joint-space heads (empty without text)
    export: EncoderExport  # everything else encoder.json records (organs, objective, commit, ...)


def source_commit() -> str:
    """The git commit of the mosmos checkout this code runs from (``-dirty`` with uncommitted
    changes), else ``mosmos <version>`` (an installed wheel has no repository)."""
    from mosmos import __version__

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(root), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        top, sha = git("rev-parse", "--show-toplevel", "HEAD").split()
        # an installed copy inside somebody else's repository must not record that repository's commit
        if Path(top).resolve() == root:
            return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no").strip() else "")
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return f"mosmos {__version__}"


def _projection_dims(head: ProjectionHead) -> dict[str, int]:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return {"in_dim": linears[0].in_features, "out_dim": linears[-1].out_features}


def write_encoder_export(
    out_dir: str | Path,
    architecture: str,
    encoder: ImageEncoder,
    preprocess: Preprocessing,
    *,
    tag_head: TagAttentionHead | None = None,
    organs: Sequence[str] = (),
    projections: Mapping[str, ProjectionHead] | None = None,
    temperature: float | None = None,
    text: Mapping[str, Any] | None = None,
    objective: Mapping[str, Any] | None = None,
) -> EncoderExport:
    """Write ``encoder.safetensors``, then ``encoder.json``, into ``out_dir`` (created when missing).

    Args:
        architecture: the registry name that rebuilds ``encoder`` (with its ``encoder_config()``).
        tag_head: the pixel-tag attention head, if any; ``organs`` names its tags in order.
        projections: joint-space projection heads by side (``"image"``, ``"text"``).
        text: how the text tower was built and where it is saved (relative to ``out_dir``).
        objective: every loss weight and gradient setting the encoder was trained with.
        preprocess, temperature: recorded as given.

    Returns:
        What ``encoder.json`` now holds.

    Raises:
        ValueError: a tag head whose tag count differs from ``organs``, an unknown projection
            side, or a record that is not JSON-serialisable.
    """
    projections = dict(projections or {})
    unknown = sorted(set(projections) - set(_PROJECTIONS))
    if unknown:
        raise ValueError(f"projections: unknown side(s) {unknown}; valid: {list(_PROJECTIONS)}")
    head_config = tag_head.head_config() if tag_head is not None else None
    if head_config is not None and head_config["num_tags"] != len(organs):
        raise ValueError(
            f"the tag head has {head_config['num_tags']} tags but {len(organs)} organs are named"
        )
    meta = EncoderExport(
        architecture=architecture,
        encoder_kwargs=encoder.encoder_config(),
        feature_channels=[int(c) for c in encoder.feature_channels],
        feature_strides=[int(s) for s in encoder.feature_strides],
        preprocess=preprocess,
        organs=list(organs),
        tag_attention=head_config,
        projections={side: _projection_dims(head) for side, head in projections.items()},
        temperature=None if temperature is None else float(temperature),
        text=None if text is None else dict(text),
        objective=dict(objective or {}),
        commit=source_commit(),
    )
    try:
        text_json = json.dumps(meta.to_dict(), indent=2) + "\n"
    except TypeError as err:
        raise ValueError(f"encoder.json would not be valid JSON: {err}") from None

    from safetensors.torch import save_file

    parts: dict[str, nn.Module] = {"encoder": encoder}
    if tag_head is not None:
        parts["tag_attention"] = tag_head
    parts.update({f"{side}_projection": head for side, head in projections.items()})
    tensors = {
        PREFIXES[part] + key: value.detach().cpu().contiguous()
        for part, module in parts.items()
        for key, value in module.state_dict().items()
    }
    out_dir = Path(out_dir)
    with atomic_path(out_dir / ENCODER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": EXPORT_FORMAT})
    atomic_write_text(out_dir / ENCODER_JSON, text_json)
    return meta


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
