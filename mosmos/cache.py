"""On-disk cache of preprocessed volumes, keyed so that a stale entry can never be read.

Loading and resampling a CT volume costs far more than a training step on it, so the deterministic
part of the chain (:func:`mosmos.transforms.build_preprocess`) runs once per volume and its output is
stored with ``monai.data.PersistentDataset``. Two things make an entry stale, and both change where
it is looked up:

- the preprocessing: the cache directory is ``cache_dir / key`` and ``key`` holds
  :meth:`PreprocessConfig.fingerprint` and the keys the chain emits (:func:`cache_key`);
- the input file: each entry's name hashes the item together with the size and modification time of
  every file it names, so a rewritten volume is preprocessed again.

Entries survive kills and bad disks (:class:`CheckedPersistentDataset`): each is written to a
temporary file beside its final name and renamed over it, so a name either holds a whole entry or
nothing; an entry that cannot be read back (truncated, empty, garbage) is logged with its path,
deleted and computed again, by training as by ``mosmos preprocess``. :func:`fill_entries` fills
a set of cached datasets ahead of training, in worker processes, one shard per rank.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import time
import zipfile
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from monai.data import Dataset, PersistentDataset
from monai.data.utils import SUPPORTED_PICKLE_MOD, pickle_hashing
from monai.utils import convert_to_tensor, look_up_option
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mosmos.errors import ConfigError, MosmosError, root_cause
from mosmos.io import atomic_path
from mosmos.transforms import PreprocessConfig

logger = logging.getLogger("mosmos")

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


class CheckedPersistentDataset(PersistentDataset):
    """``monai.data.PersistentDataset`` whose entries are written atomically and rebuilt when unreadable.

    MONAI 1.6 writes an entry in the system's temporary folder and ``shutil.move``-s it into the
    cache: a rename only when both are on one file system, otherwise a copy that a kill can cut
    short. It also rebuilds only entries failing with ``UnpicklingError`` or a bad magic number,
    while a truncated entry raises ``RuntimeError`` ("failed finding central directory") or
    ``OSError`` and an empty one ``EOFError``, which stopped training. Here an entry goes to a
    temporary file beside its final name, is fsynced and renamed (:func:`mosmos.io.atomic_path`),
    and any read error but a permission error marks it corrupt: it is logged with its path,
    deleted and computed again.
    """

    def entry_path(self, index: int) -> Path:
        """Where item ``index``'s entry lives, whether or not it exists yet."""
        return self._path_of(self.data[index])

    def _path_of(self, item: Any) -> Path:
        return Path(self.cache_dir) / f"{self.hash_func(item).decode('utf-8')}{self.transform_hash}.pt"

    @staticmethod
    def _discard(path: Path, exc: BaseException) -> None:
        logger.warning(
            "corrupt cache entry %s (%s: %s): deleted, preprocessing it again", path, type(exc).__name__, exc
        )
        path.unlink(missing_ok=True)

    def _save(self, path: Path, value: Any) -> None:
        # through a file object: torch names the archive's records after a file name it is given,
        # which would put the random temporary name into the bytes of every entry
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            torch.save(
                convert_to_tensor(value, convert_numeric=False, track_meta=self.track_meta),
                fh,
                pickle_module=look_up_option(self.pickle_module, SUPPORTED_PICKLE_MOD),
                pickle_protocol=self.pickle_protocol,
            )

    def _cachecheck(self, item_transformed: Any) -> Any:
        if self.cache_dir is None:
            return self._pre_transform(deepcopy(item_transformed))
        path = self._path_of(item_transformed)
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except FileNotFoundError:  # removed meanwhile (e.g. by a rank rebuilding it)
                pass
            except PermissionError:
                raise
            except Exception as exc:  # truncated: RuntimeError/OSError; empty: EOFError; garbage: ...
                self._discard(path, exc)
        value = self._pre_transform(deepcopy(item_transformed))  # deepcopy: keep the hashed item intact
        with contextlib.suppress(PermissionError):  # a read-only cache still serves its entries, as in MONAI
            self._save(path, value)
        return value

    def entry_ok(self, path: Path, verify: bool = False) -> bool:
        """Whether the entry at ``path`` exists and reads back; a corrupt one is logged and deleted.

        The quick check maps the file (``torch.load(mmap=True)``): it reads the zip directory and the
        pickle, which a truncated, empty or foreign file fails, but not the tensors. ``verify`` also
        checks every record's CRC, reading the whole file.
        """
        try:
            torch.load(path, weights_only=True, mmap=True)
            if verify:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    raise ValueError(f"record {bad} fails its CRC check")
        except FileNotFoundError:
            return False
        except PermissionError:
            raise
        except Exception as exc:
            self._discard(path, exc)
            return False
        return True

    def fill(self, index: int, verify: bool = False) -> str:
        """Give item ``index`` a readable entry: ``"present"`` (already there, not recomputed),
        ``"built"`` or ``"rebuilt"`` (it was corrupt)."""
        path = self.entry_path(index)
        existed = path.is_file()
        if existed and self.entry_ok(path, verify):
            return "present"
        self._save(path, self._pre_transform(deepcopy(self.data[index])))
        return "rebuilt" if existed else "built"


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
    return CheckedPersistentDataset(
        data=list(data),
        transform=transform,
        cache_dir=directory,
        hash_func=_stat_aware_hash,
        track_meta=track_meta,
    )


STALE_TEMPORARY_S = 3600.0  # a temporary entry this old was left by a killed writer, not a running one
STATUSES = ("present", "built", "rebuilt", "failed")


def shard_from_env() -> tuple[int, int]:
    """``(rank, world size)`` from ``RANK`` / ``WORLD_SIZE`` (set by ``accelerate launch`` and
    ``torchrun``); ``(0, 1)`` outside a launch. No process group is needed."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ConfigError(
            f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} must be integers"
        ) from None


def _reason(cause: BaseException) -> str:
    """``Type: message`` of an error, without the tracebacks MONAI's ``LoadImage`` pastes into its
    message (one per reader tried): the first reader's own error line stands for them."""
    text = str(cause)
    header = "Traceback (most recent call last):"
    if header in text:
        block = text.split(header)[1]
        lines = [line for line in block.splitlines() if line.strip() and not line[0].isspace()]
        if lines:
            return lines[0]
    return f"{type(cause).__name__}: {text}"


class _FillJobs(torch.utils.data.Dataset):
    """Job ``j`` fills entry ``jobs[j] = (dataset, item)``; it yields ``(status, entry path, error)``,
    never the volume, so nothing large crosses between processes."""

    def __init__(
        self, datasets: Sequence[CheckedPersistentDataset], jobs: list[tuple[int, int]], verify: bool
    ):
        self.datasets, self.jobs, self.verify = datasets, jobs, verify

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, j: int) -> tuple[str, str, str]:
        ds, i = self.datasets[self.jobs[j][0]], self.jobs[j][1]
        path = str(ds.entry_path(i))
        try:
            return ds.fill(i, self.verify), path, ""
        except Exception as exc:  # reported by the caller, naming the input; the other jobs go on
            cause, item = root_cause(exc), ds.data[i]
            if isinstance(cause, MosmosError):
                return "failed", path, str(cause)
            where = " + ".join(map(str, item.values())) if isinstance(item, dict) else str(item)
            return "failed", path, f"{where}: cannot load and preprocess: {_reason(cause)}"


def _identity(x: Any) -> Any:
    return x


def _remove_stale_temporaries(directory: Path) -> None:
    """Delete the temporary entries (``.NAME.pt.XXXX.tmp``) of writers killed long ago."""
    now = time.time()
    for tmp in directory.glob(".*.pt.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMPORARY_S:
                tmp.unlink()
        except OSError:  # gone already, or not ours to delete
            pass


def fill_entries(
    datasets: Sequence[Dataset],
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    verify: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Give every item of ``datasets`` a readable cache entry, for this rank's shard.

    Args:
        datasets: from :func:`cached_dataset`, with a cache directory.
        workers: processes computing entries (a ``torch`` DataLoader's workers, one thread each);
            0 computes them in this process.
        rank: this process's index among ``world``; its shard is every ``world``-th distinct entry
            from the ``rank``-th, so the ranks of a launch split the work without talking.
        world: number of processes sharing the work.
        verify: checksum every existing entry (reads it whole) instead of the quick header check.
        progress: show a progress bar.

    Returns:
        ``entries`` (distinct entries of all shards), ``total`` (this shard's), ``present`` (complete
        already, not recomputed), ``built``, ``rebuilt`` (were corrupt), ``failed``, ``failures``
        (messages naming the inputs), ``seconds``, ``volumes_per_s`` (entries computed per second),
        ``rank``, ``world``, ``workers`` and ``cache_dirs``.

    Example:
        >>> fill_entries([data.train._volumes, data.val._volumes], workers=8)  # doctest: +SKIP
    """
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank {rank} of world size {world}: need world >= 1 and 0 <= rank < world")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    jobs, seen, dirs = [], set(), []
    for d, ds in enumerate(datasets):
        if not isinstance(ds, CheckedPersistentDataset):
            raise ConfigError(f"dataset {d} ({type(ds).__name__}) has no on-disk cache to fill")
        if ds.cache_dir not in dirs:
            dirs.append(ds.cache_dir)
        for i in range(len(ds)):
            path = ds.entry_path(i)
            if path not in seen:  # an item in two datasets is one entry, filled once
                seen.add(path)
                jobs.append((d, i))
    for directory in dirs:
        _remove_stale_temporaries(Path(directory))
    mine = jobs[rank::world]
    workers = min(workers, len(mine))
    out: dict[str, Any] = dict.fromkeys(STATUSES, 0)
    failures: list[str] = []
    start = time.perf_counter()
    if mine:
        options = (
            {"in_order": False} if workers and "in_order" in inspect.signature(DataLoader).parameters else {}
        )
        loader = DataLoader(
            _FillJobs(datasets, mine, verify),
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            **options,
        )
        with tqdm(total=len(mine), desc="preprocess", unit="vol", disable=not progress) as bar:
            for status, _, error in loader:
                out[status] += 1
                if error:
                    failures.append(error)
                bar.update()
                bar.set_postfix(built=out["built"] + out["rebuilt"], present=out["present"], refresh=False)
    seconds = time.perf_counter() - start
    computed = out["built"] + out["rebuilt"]
    out.update(
        entries=len(jobs),
        total=len(mine),
        failures=failures,
        seconds=seconds,
        volumes_per_s=computed / seconds if computed and seconds > 0 else 0.0,
        rank=rank,
        world=world,
        workers=workers,
        cache_dirs=[str(d) for d in dirs],
    )
    return out
