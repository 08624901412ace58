"""Writing an encoder export: ``encoder.safetensors``, then ``encoder.json`` (see :mod:`mosmos.export`),
and the commit an export records."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mosmos.export_format import (
    ENCODER_JSON,
    ENCODER_WEIGHTS,
    EXPORT_FORMAT,
    PREFIXES,
    EncoderExport,
    Preprocessing,
)
from mosmos.io import atomic_path, atomic_write_text
from mosmos.models.encoders.base import ImageEncoder
from mosmos.models.pretrain_model import ProjectionHead
from mosmos.models.tag_head import TagAttentionHead

__all__ = ["source_commit", "write_encoder_export"]

_PROJECTIONS = ("image", "text")


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
