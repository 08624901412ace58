"""The config hash that names pretraining variants and guards benchmark cells: a short hash of a
resolved stage config without the keys that do not change results, and robust to keys added later."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mosmos.config import to_dict

__all__ = ["NEUTRAL_KEYS", "NEWER_DEFAULTS", "NEWER_KEYS", "config_hash"]

#: Keys of the stage configs that do not change a run's results (where it writes, how it resumes,
#: which pictures it draws): left out of every hash.
NEUTRAL_KEYS = (
    "output_dir",
    "data.cache_dir",
    "train.resume",
    "train.overwrite",
    "eval.overlays",
    "train.snapshot_steps",  # extra weight files for the learning curves; the training is the same
)
#: Keys added to the stage configs after benchmarks were run: left out of the hash while null (what
#: every earlier run had), so the folders of those benchmarks still match their configs.
NEWER_KEYS = ("data.subset_datasets", "train.stop_after_steps")


#: Keys added later with a non-null default (key -> default): left out of the hash at that default.
NEWER_DEFAULTS: dict[str, Any] = {
    "model.output_channels": "organ",
    "model.transfer": "encoder",
    "train.head_warmup_steps": 0,
    "train.rewarm_steps": 0,
    "train.cpu_processes": 1,
}


def config_hash(cfg: Any, ignore: tuple[str, ...] = NEUTRAL_KEYS) -> str:
    """Short hash of a resolved config, without the keys that do not change results (``ignore``),
    the :data:`NEWER_KEYS` left null and the :data:`NEWER_DEFAULTS` left at their default."""
    tree = to_dict(cfg)
    defaults = {**dict.fromkeys(NEWER_KEYS), **NEWER_DEFAULTS}
    for key in (*ignore, *defaults):
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part, {})
        if key in ignore or (leaf in node and node[leaf] == defaults[key]):
            node.pop(leaf, None)
    text = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]
