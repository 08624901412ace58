"""Stage 2 model building and stage 1 transfer: build a segmenter around an exported encoder (and,
for MOSMOS, its tag attention head) and load the weights with a readable report.

The export itself (``encoder.safetensors`` + ``encoder.json``) is read by :mod:`mosmos.export`; what
is stage 2's here is fitting it into a segmenter whose encoder may differ, and saying which keys
were loaded, missing or skipped.

``transfer="encoder_decoder"`` (``model.transfer``) is MultiTalent's transfer (Ulrich et al., MICCAI
2023, arXiv:2303.14444): ``init`` is a stage 2 run directory and the whole network of the same
architecture is carried over, encoder and decoder, but for the parts tied to the source's output
channels and tasks (the output head(s) and task tokens,
:meth:`~mosmos.models.segmentation.SegmenterBase.is_task_specific`), which start fresh and are
warmed up alone first (``train.head_warmup_steps``).

Example::

    model, report = build_segmenter("unet", num_classes=11, num_tasks=3, init="runs/pretrain",
                                    use_attention_maps=True)
    print(report.format())
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mosmos.errors import ConfigError
from mosmos.export import build_tag_head, export_paths, read_encoder_export
from mosmos.export_format import PREFIXES, EncoderExport

__all__ = [
    "DEFAULT_ENCODERS",
    "TRANSFERS",
    "LoadReport",
    "build_segmenter",
    "load_encoder_weights",
    "load_network_weights",
    "read_network_source",
]

#: What ``model.init`` transfers (``model.transfer``).
TRANSFERS = ("encoder", "encoder_decoder")

#: Encoder built for each segmenter when ``init="random"`` and no ``encoder`` is named.
DEFAULT_ENCODERS = {
    "unet": "rescnn3d",
    "mo_ctrans": "rescnn3d",
    "mo_ctrans_conv": "rescnn3d",
    "unetr": "vit3d",
}
#: Encoders whose input size is fixed at construction (``img_size``).
_SIZED_ENCODERS = ("vit3d", "vit2d")
#: The export part each segmenter module loads from.
_FILE_PREFIXES = {"encoder": PREFIXES["encoder"], "attention_head": PREFIXES["tag_attention"]}


@dataclass
class LoadReport:
    """What :func:`load_encoder_weights` did.

    Attributes:
        source: the ``encoder.safetensors`` file read.
        loaded: file keys copied into the model.
        missing: model keys (``encoder.*``, and ``attention_head.*`` with attention maps) that the
            file does not have; they keep their initial values.
        skipped: file keys not used (e.g. ``tag_attention.*`` when attention maps are off).
        filled: model keys (parameters and buffers) whose values came from the file; every other
            parameter is new (what ``train.head_warmup_steps`` trains alone first).
        what: what was transferred, for :meth:`format`.
    """

    source: Path
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    what: str = "stage 1 weights"

    def format(self, max_keys: int = 5) -> str:
        """A short report: counts, and up to ``max_keys`` names per non-empty list."""
        lines = [
            f"loaded {self.what} from {self.source}: {len(self.loaded)} loaded, "
            f"{len(self.missing)} missing, {len(self.skipped)} skipped"
        ]
        for label, keys in (("missing", self.missing), ("skipped", self.skipped), ("loaded", self.loaded)):
            if keys:
                shown = ", ".join(keys[:max_keys])
                more = f", ... (+{len(keys) - max_keys} more)" if len(keys) > max_keys else ""
                lines.append(f"  {label}: {shown}{more}")
        return "\n".join(lines)


def load_encoder_weights(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    source: str | Path,
    use_attention_maps: bool = False,
) -> LoadReport:
    """Copy an export's tensors into ``model.encoder`` (``encoder.*``) and, with attention maps, into
    ``model.attention_head`` (``tag_attention.*``), after checking every shape.

    Raises:
        ConfigError: listing every key whose checkpoint shape differs from the model's, or when no
            ``encoder.*`` key matches the model at all.
    """
    targets: dict[str, nn.Module] = {"encoder": model.encoder}
    if use_attention_maps:
        if getattr(model, "attention_head", None) is None:
            raise ConfigError("use_attention_maps needs a model with an attention_head")
        targets["attention_head"] = model.attention_head
    report = LoadReport(source=Path(source))
    selected: dict[str, dict[str, torch.Tensor]] = {name: {} for name in targets}
    mismatched = []
    expected = {name: module.state_dict() for name, module in targets.items()}
    for key in sorted(tensors):
        target = next((n for n, prefix in _FILE_PREFIXES.items() if key.startswith(prefix)), None)
        if target not in targets:
            report.skipped.append(key)
            continue
        sub = key[len(_FILE_PREFIXES[target]) :]
        if sub not in expected[target]:
            report.skipped.append(key)
            continue
        want, got = tuple(expected[target][sub].shape), tuple(tensors[key].shape)
        if want != got:
            mismatched.append(f"  {key}: checkpoint {list(got)} vs model {list(want)}")
            continue
        selected[target][sub] = tensors[key]
        report.loaded.append(key)
        report.filled.append(f"{target}.{sub}")
    if mismatched:
        raise ConfigError(
            f"stage 1 weights in {source} do not fit the model ({len(mismatched)} shape mismatches):\n"
            + "\n".join(mismatched)
            + "\nLeave model.encoder / model.encoder_kwargs unset to take the architecture from encoder.json."
        )
    if not selected["encoder"]:
        raise ConfigError(
            f"no encoder.* tensor in {source} matches the model's encoder "
            f"({len(expected['encoder'])} keys, e.g. {next(iter(expected['encoder']), None)!r})"
        )
    for name, module in targets.items():
        report.missing += [f"{name}.{k}" for k in expected[name] if k not in selected[name]]
        module.load_state_dict(selected[name], strict=False)
    return report


def read_network_source(run_dir: str | Path) -> tuple[Any, dict[str, torch.Tensor], Path]:
    """A stage 2 run's ``model.json`` (:class:`~mosmos.finetune.inference.ModelSpec`), its weights and
    the weights' path: the source of a ``model.transfer=encoder_decoder`` initialisation.

    Raises:
        ConfigError: ``run_dir`` is not a stage 2 run directory with both files, or they are unreadable.
    """
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mosmos.finetune.inference import MODEL_FILE, SPEC_FILE, ModelSpec

    path = Path(run_dir)
    if path.is_file():
        path = path.parent
    weights, spec_path = path / MODEL_FILE, path / SPEC_FILE
    if not (weights.is_file() and spec_path.is_file()):
        raise ConfigError(
            f"model.init={run_dir} with model.transfer=encoder_decoder: no {MODEL_FILE} + {SPEC_FILE} there; "
            "the whole-network transfer needs a stage 2 run directory (a stage 1 export has no decoder: "
            "use model.transfer=encoder)"
        )
    try:
        spec = ModelSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")), str(spec_path))
        tensors = load_file(str(weights))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as err:
        raise ConfigError(f"cannot read the stage 2 run {path}: {err}") from None
    return spec, tensors, weights


def load_network_weights(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str | Path
) -> LoadReport:
    """Copy a same-architecture network's weights into ``model``: every parameter and buffer but the
    task-specific ones (output head(s), task tokens), which keep their fresh initialisation.

    Raises:
        ConfigError: listing every non-task-specific key the file lacks or holds with another shape
            (the networks differ).
    """
    report = LoadReport(source=Path(source), what="the network (encoder and decoder)")
    expected = model.state_dict()
    selected: dict[str, torch.Tensor] = {}
    problems = []
    for key, value in expected.items():
        if model.is_task_specific(key):
            report.missing.append(key)
        elif key not in tensors:
            problems.append(f"  {key}: not in the file")
        elif tuple(tensors[key].shape) != tuple(value.shape):
            problems.append(f"  {key}: file {list(tensors[key].shape)} vs model {list(value.shape)}")
        else:
            selected[key] = tensors[key]
    if problems:
        raise ConfigError(
            f"model.transfer=encoder_decoder: the network in {source} is not this one's architecture "
            f"({len(problems)} problems):\n"
            + "\n".join(problems[:10])
            + "\nUse the same model.name, encoder and decoder settings as that run, or model.transfer=encoder."
        )
    model.load_state_dict(selected, strict=False)
    report.loaded = sorted(selected)
    report.filled = sorted(selected)
    report.skipped = sorted(k for k in tensors if k not in selected)
    return report


def build_segmenter(
    name: str,
    num_classes: int,
    num_tasks: int = 1,
    init: str | Path = "random",
    encoder: str | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
    use_attention_maps: bool = False,
    decoder_kwargs: dict[str, Any] | None = None,
    img_size: list[int] | tuple[int, ...] | int | None = None,
    transfer: str = "encoder",
) -> tuple[nn.Module, LoadReport | None]:
    """Build a registered segmenter, from scratch or around a stage 1 encoder.

    Args:
        name: registered segmenter (``unet``, ``mo_ctrans``, ``mo_ctrans_conv``, ``unetr``).
        num_classes: output channels (organs).
        num_tasks: task tokens (datasets).
        init: ``"random"``, or a stage 1 export (run directory or ``encoder.safetensors``).
        encoder: registered image encoder. Default: with ``init="random"``,
            :data:`DEFAULT_ENCODERS` (``vit3d`` for ``unetr``, else ``rescnn3d``); with an export,
            its ``architecture``.
        encoder_kwargs: encoder constructor kwargs. Default: with an export whose architecture is
            the encoder's, its ``encoder_kwargs``; else ``{}``.
        use_attention_maps: MOSMOS transfer: rebuild the export's tag attention head and feed its
            maps to the decoder (needs an export with ``tag_attention``).
        decoder_kwargs: extra segmenter constructor kwargs.
        img_size: input size for encoders fixed at construction (``vit3d`` / ``vit2d``) when
            ``encoder_kwargs`` has no ``img_size``; ignored for other encoders.
        transfer: ``"encoder"`` (the export's encoder, and tag head with attention maps) or
            ``"encoder_decoder"`` (``init`` is a stage 2 run of the same architecture: everything but
            the output head(s) and task tokens; the encoder, tag head and decoder settings default
            to that run's, ``encoder``, ``encoder_kwargs`` and ``decoder_kwargs`` win).

    Returns:
        ``(model, report)``; ``report`` is None with ``init="random"``.

    Raises:
        ConfigError: unknown names or bad kwargs, an unreadable export, attention maps without a
            stage 1 head, or weights that do not fit (see :func:`load_encoder_weights`).
    """
    from mosmos.models.registry import create_image_encoder, list_models

    segmenters = list_models("segmenter")
    if name not in segmenters:
        raise ConfigError(f"unknown segmenter {name!r}; valid names: {segmenters}")
    if transfer not in TRANSFERS:
        raise ConfigError(f"model.transfer={transfer!r} is not one of {list(TRANSFERS)}")
    random_init = init is None or str(init) == "random"
    if transfer == "encoder_decoder":
        if random_init:
            raise ConfigError("model.transfer=encoder_decoder needs a stage 2 run directory in model.init")
        return _build_from_network(
            name, num_classes, num_tasks, init, encoder, encoder_kwargs, use_attention_maps, decoder_kwargs
        )
    meta: EncoderExport | None = None
    tensors: dict[str, torch.Tensor] = {}
    if random_init:
        if use_attention_maps:
            raise ConfigError(
                "use_attention_maps needs a stage 1 export as init (the tag attention head comes from "
                "it); with init='random' there is no head to transfer"
            )
        arch = encoder or DEFAULT_ENCODERS.get(name, "rescnn3d")
        kwargs = dict(encoder_kwargs or {})
    else:
        meta, tensors = read_encoder_export(init)
        arch = encoder or meta.architecture
        if encoder_kwargs is not None:
            kwargs = dict(encoder_kwargs)
        else:
            kwargs = dict(meta.encoder_kwargs) if arch == meta.architecture else {}
    if img_size is not None and arch in _SIZED_ENCODERS:
        kwargs.setdefault("img_size", [img_size] if isinstance(img_size, int) else list(img_size))
    try:
        image_encoder = create_image_encoder(arch, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build image encoder {arch!r} with {kwargs}: {err}") from err

    head = None
    if use_attention_maps:
        head = build_tag_head(meta, export_paths(init)[0])
        if head is None:
            raise ConfigError(
                f"use_attention_maps: the stage 1 export {init} has no tag_attention head "
                f"(it was pretrained without tags); turn attention maps off"
            )

    model = _create_segmenter(name, image_encoder, num_classes, num_tasks, head, decoder_kwargs or {})
    if random_init:
        return model, None
    return model, load_encoder_weights(model, tensors, export_paths(init)[1], use_attention_maps)


def _build_from_network(
    name: str,
    num_classes: int,
    num_tasks: int,
    init: str | Path,
    encoder: str | None,
    encoder_kwargs: dict[str, Any] | None,
    use_attention_maps: bool,
    decoder_kwargs: dict[str, Any] | None,
) -> tuple[nn.Module, LoadReport]:
    """:func:`build_segmenter` with ``transfer="encoder_decoder"``: the source run's network with
    this run's output channels and tasks, its weights but the task-specific ones loaded."""
    from mosmos.models.registry import create_image_encoder
    from mosmos.models.tag_head import TagAttentionHead

    spec, tensors, weights = read_network_source(init)
    if spec.name != name:
        raise ConfigError(
            f"model.transfer=encoder_decoder: {init} is a {spec.name!r} network, this run builds {name!r}; "
            "the decoder transfers only between the same networks (or use model.transfer=encoder)"
        )
    if use_attention_maps != (spec.attention_head is not None):
        raise ConfigError(
            f"model.transfer=encoder_decoder: model.attention_maps={str(use_attention_maps).lower()} but the "
            f"run in {init} was trained {'with' if spec.attention_head else 'without'} attention maps"
        )
    arch = encoder or spec.encoder
    if encoder_kwargs is not None:
        kwargs = dict(encoder_kwargs)
    else:
        kwargs = dict(spec.encoder_kwargs) if arch == spec.encoder else {}
    try:
        image_encoder = create_image_encoder(arch, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build image encoder {arch!r} with {kwargs}: {err}") from err
    head = TagAttentionHead.from_config(spec.attention_head) if spec.attention_head else None
    # the source's decoder settings, this run's decoder_kwargs on top (deep supervision is this run's:
    # its heads are task-specific and start fresh either way)
    inherited = {
        k: v for k, v in spec.decoder.items() if k not in ("num_classes", "num_tasks", "deep_supervision")
    }
    model = _create_segmenter(
        name, image_encoder, num_classes, num_tasks, head, {**inherited, **(decoder_kwargs or {})}
    )
    return model, load_network_weights(model, tensors, weights)


def _create_segmenter(
    name: str, image_encoder: nn.Module, num_classes: int, num_tasks: int, head: Any, decoder_kwargs: dict
) -> nn.Module:
    """The registered segmenter ``name`` around ``image_encoder``; a bad setting is a ConfigError."""
    from mosmos.models.registry import create_model

    try:
        return create_model(
            "segmenter",
            name,
            encoder=image_encoder,
            num_classes=num_classes,
            num_tasks=num_tasks,
            attention_head=head,
            **decoder_kwargs,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build segmenter {name!r}: {err}") from err
