"""Stage 2 model building and stage 1 transfer: build a segmenter around an exported encoder (and,
for MOSMOS, its tag attention head) and load the weights with a readable report.

The export itself (``encoder.safetensors`` + ``encoder.json``) is read by :mod:`mosmos.export`; what
is stage 2's here is fitting it into a segmenter whose encoder may differ, and saying which keys
were loaded, missing or skipped.

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
from mosmos.export import PREFIXES, EncoderExport, build_tag_head, export_paths, read_encoder_export

__all__ = ["DEFAULT_ENCODERS", "LoadReport", "build_segmenter", "load_encoder_weights"]

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
    """

    source: Path
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def format(self, max_keys: int = 5) -> str:
        """A short report: counts, and up to ``max_keys`` names per non-empty list."""
        lines = [
            f"loaded stage 1 weights from {self.source}: {len(self.loaded)} loaded, "
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

    Returns:
        ``(model, report)``; ``report`` is None with ``init="random"``.

    Raises:
        ConfigError: unknown names or bad kwargs, an unreadable export, attention maps without a
            stage 1 head, or weights that do not fit (see :func:`load_encoder_weights`).
    """
    from mosmos.models.registry import create_image_encoder, create_model, list_models

    segmenters = list_models("segmenter")
    if name not in segmenters:
        raise ConfigError(f"unknown segmenter {name!r}; valid names: {segmenters}")
    random_init = init is None or str(init) == "random"
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

    try:
        model = create_model(
            "segmenter",
            name,
            encoder=image_encoder,
            num_classes=num_classes,
            num_tasks=num_tasks,
            attention_head=head,
            **(decoder_kwargs or {}),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build segmenter {name!r}: {err}") from err
    if random_init:
        return model, None
    return model, load_encoder_weights(model, tensors, export_paths(init)[1], use_attention_maps)
