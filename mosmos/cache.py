"""On-disk cache of preprocessed volumes, keyed so that a stale entry can never be read.

Loading and resampling a CT volume costs far more than a training step on it, so the deterministic
part of the chain (:func:`mosmos.transforms.build_preprocess`) runs once per volume and its output is
stored with ``monai.data.PersistentDataset``. Two things make an entry stale, and both change where
it is looked up:

- the preprocessing: the cache directory is ``cache_dir / key`` and ``key`` holds
  :meth:`PreprocessConfig.fingerprint` and the keys the chain emits (:func:`cache_key`);
- the input file: each entry's name hashes the item together with the size and modification time of
  every file it names, so a rewritten volume is preprocessed again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.data import Dataset, PersistentDataset
from monai.data.utils import pickle_hashing

from mosmos.errors import ConfigError
from mosmos.transforms import PreprocessConfig

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def cache_key(
    cfg: PreprocessConfig,
    keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = (),
    prefix: str = "preprocess",
) -> str:
    """Cache sub-directory name for a chain: ``prefix-<fingerprint>-<keys>``."""
    names = "-".join([*keys, *label_keys])
    return f"{prefix}-{cfg.fingerprint()}-{names}"


def _stat_aware_hash(item: Any) -> bytes:
    """MONAI's pickle hash of the item, with (size, mtime) added for every value naming a file."""
    if isinstance(item, dict):
        stamped = {}
        for k, v in item.items():
            if isinstance(v, (str, os.PathLike)) and os.path.isfile(v):
                st = os.stat(v)
                v = (os.fspath(v), st.st_size, st.st_mtime_ns)
            stamped[k] = v
        item = stamped
    return pickle_hashing(item)


def cached_dataset(
    data: Sequence[dict],
    transform: Callable,
    cache_dir: str | Path | None,
    key: str,
    track_meta: bool = False,
) -> Dataset:
    """A dataset applying ``transform`` to ``data``, cached under ``cache_dir / key``.

    Args:
        data: items for the transform, e.g. ``{"image": path, "label": path}``. Keep them to what the
            transform reads: every value is part of the entry's hash.
        transform: a deterministic chain (``build_preprocess(..., train=False)``); if it holds random
            transforms, ``PersistentDataset`` caches only up to the first one.
        cache_dir: root of the cache; ``None`` gives an uncached ``monai.data.Dataset``.
        key: sub-directory for this chain, from :func:`cache_key`.
        track_meta: keep MetaTensors (affine, applied operations) in cached entries; plain tensors
            otherwise, which is all training needs.
    """
    if cache_dir is None:
        return Dataset(data=list(data), transform=transform)
    if not _KEY_RE.match(key):
        raise ConfigError(f"cache key {key!r} must be one path component of letters, digits, '.', '_', '-'")
    directory = Path(cache_dir).expanduser() / key
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create cache directory {directory}: {e.strerror}") from None
    return PersistentDataset(
        data=list(data),
        transform=transform,
        cache_dir=directory,
        hash_func=_stat_aware_hash,
        track_meta=track_meta,
    )
