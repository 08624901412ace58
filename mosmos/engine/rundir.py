"""The run directory a run starts in: continue, start afresh or refuse (``train.resume``,
``train.overwrite``), and no half-made directory after a failed start.

``train.resume: auto`` (the default) looks at ``output_dir`` before anything is written:

- missing, empty, or without checkpoints: a fresh start;
- checkpoints of a run whose saved ``config.yaml`` equals this config (up to
  :data:`RESULT_NEUTRAL_KEYS`): continue from the newest usable one, as ``latest`` does;
- checkpoints of a run of another config: refused, naming the keys that differ;
- a finished run (its final export, :func:`finished_export`): refused.

``train.resume: null`` always starts afresh and so refuses a directory that holds checkpoints or a
finished run (a fresh run beside old checkpoints would mix them: ``latest`` could later pick an old
run's newer step). ``latest`` and a checkpoint path continue as they always did, without these checks.
``train.overwrite: true`` (``--overwrite``) removes the earlier run's files first, and refuses
instead when the directory also holds files mosmos does not write (:data:`RUN_FILES`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from mosmos.config import from_dict, to_dict
from mosmos.engine.checkpoints import list_checkpoints
from mosmos.errors import ConfigError

CONFIG_FILE = "config.yaml"

#: Keys that do not change what a run computes: a run saved with other values of these continues.
RESULT_NEUTRAL_KEYS = (
    "output_dir",
    "data.cache_dir",
    "train.resume",
    "train.overwrite",
    "train.num_workers",  # the data order and augmentation are seeded per (seed, epoch, sample)
    "train.log_with",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.snapshot_steps",  # extra weight files; the training itself is the same
    "eval.attention_overlays",
    "eval.overlays",
)

#: What mosmos writes at the top of a run directory (stage 1, stage 2, mutual learning's stage folders,
#: ``mosmos evaluate``'s default ``eval_<dataset>`` folders): what ``--overwrite`` removes.
RUN_FILES = (
    CONFIG_FILE,
    "versions.json",
    "metrics.json",
    "autotune.json",
    "skipped.csv",
    "checkpoints",
    "snapshots",
    "logs",
    # stage 1
    "encoder.safetensors",
    "encoder.json",
    "text",
    "attention",
    # stage 2
    "model.safetensors",
    "model.json",
    "best.json",
    "split.json",
    "val_cases.csv",
    "overlays",
    "stage_a",
    "stage_b",
    "pseudo_labels",
    "eval_*",
)


def _is_run_file(name: str) -> bool:
    # a hidden *.tmp is an atomic write a kill interrupted (mosmos.io.atomic_path, the PNG writers)
    return any(fnmatch.fnmatchcase(name, p) for p in RUN_FILES) or (
        name.startswith(".") and name.endswith(".tmp")
    )


def foreign_entries(output_dir: str | Path) -> list[str]:
    """Names at the top of ``output_dir`` that mosmos does not write into a run directory."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not _is_run_file(p.name))


def _checkpoint_dirs(output_dir: str | Path) -> set[Path]:
    root = Path(output_dir)
    if not root.is_dir():
        return set()
    found = set(list_checkpoints(root))
    for sub in root.iterdir():
        if sub.is_dir():
            found.update(list_checkpoints(sub))
    return found


def has_checkpoints(output_dir: str | Path) -> bool:
    """``checkpoints/step_N`` in the run, or in one of its stage folders (mutual learning's)."""
    return bool(_checkpoint_dirs(output_dir))


def finished_export(output_dir: str | Path) -> str | None:
    """What marks ``output_dir`` as a finished run, or None: stage 1's ``encoder.json`` (written
    after the weights, at the very end), stage 2's ``metrics.json`` with its ``best`` record (written
    once training is over; ``model.safetensors`` itself is rewritten at every new best)."""
    root = Path(output_dir)
    if (root / "encoder.json").is_file():
        return "encoder.json"
    try:
        metrics = json.loads((root / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return "metrics.json with its best record" if isinstance(metrics, dict) and "best" in metrics else None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def config_differences(cfg: Any, output_dir: str | Path) -> dict[str, tuple[Any, Any]] | None:
    """``{key: (saved, new)}`` for every setting in which ``cfg`` differs from the ``config.yaml``
    saved in ``output_dir`` (keys of :data:`RESULT_NEUTRAL_KEYS` aside); None without one.

    The saved config is read through ``cfg``'s own schema first, so a key that a newer mosmos added
    counts as its default; a saved config the schema no longer accepts is compared as written."""
    path = Path(output_dir) / CONFIG_FILE
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: the saved config of the run cannot be read ({exc})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: the saved config of the run is not a mapping")
    with contextlib.suppress(ConfigError):
        saved = to_dict(from_dict(type(cfg), saved))
    # through YAML both ways, so that tuples and lists, ints and floats compare as they were saved
    old = _flatten(yaml.safe_load(yaml.safe_dump(saved)))
    new = _flatten(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    neutral = set(RESULT_NEUTRAL_KEYS)
    return {
        key: (old.get(key, "<absent>"), new.get(key, "<absent>"))
        for key in sorted(set(old) | set(new))
        if key not in neutral
        and not any(key.startswith(f"{k}.") for k in neutral)
        and old.get(key, "<absent>") != new.get(key, "<absent>")
    }


def _describe(diff: dict[str, tuple[Any, Any]], most: int = 6) -> str:
    items = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(diff.items())[:most]]
    more = f" and {len(diff) - most} more" if len(diff) > most else ""
    return ", ".join(items) + more


def plan_run_dir(cfg: Any, train: Any) -> bool:
    """Decide whether a run of ``cfg`` may start in ``cfg.output_dir`` (read-only: every process
    calls it before any writes).

    Returns:
        True when the earlier run's files are to be removed first (``train.overwrite``).

    Raises:
        ConfigError: the directory holds a finished run, a run of another config, checkpoints that
            ``train.resume: null`` would mix with its own, or (with ``train.overwrite``) files
            mosmos did not write; the message names the directory and how to go on.
    """
    out = Path(cfg.output_dir)
    resume, overwrite = train.resume, getattr(train, "overwrite", False)
    if overwrite and resume not in ("auto", None):
        raise ConfigError(
            f"train.overwrite=true starts {out} afresh and cannot be combined with "
            f"train.resume={resume!r}: drop one of them"
        )
    if resume not in ("auto", None) or not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"output_dir={out} is a file, not a directory")
    finished = finished_export(out)
    progress = has_checkpoints(out)
    if overwrite:
        if not (finished or progress or (out / CONFIG_FILE).is_file()):
            return False  # no run to replace
        foreign = foreign_entries(out)
        if foreign:
            raise ConfigError(
                f"--overwrite: {out} also holds files that mosmos does not write ({', '.join(foreign[:6])}); "
                "nothing was deleted: move them away, or choose a new output_dir"
            )
        return True
    if finished:
        raise ConfigError(
            f"{out} holds a finished run ({finished}): pass --overwrite (train.overwrite=true) to "
            "replace it, or choose a new output_dir"
        )
    if not progress:
        return False
    if resume is None:
        raise ConfigError(
            f"train.resume=null starts afresh, but {out} holds checkpoints of an earlier run: continue "
            "it with train.resume=auto, replace it with --overwrite (train.overwrite=true), or choose "
            "a new output_dir"
        )
    diff = config_differences(cfg, out)
    if diff is None:
        raise ConfigError(
            f"{out} holds checkpoints but no {CONFIG_FILE} to compare this config with: pass --overwrite "
            "(train.overwrite=true) to replace them, train.resume=latest to continue from them, or "
            "choose a new output_dir"
        )
    if diff:
        raise ConfigError(
            f"{out} holds an unfinished run of another config, which differs in {_describe(diff)}: "
            "choose a new output_dir, pass --overwrite (train.overwrite=true) to replace it, or "
            "train.resume=latest to continue it with this config"
        )
    return False


def clear_run_dir(output_dir: str | Path) -> list[str]:
    """Remove what mosmos wrote at the top of ``output_dir`` (:data:`RUN_FILES`); returns the names.
    Anything else stays (:func:`plan_run_dir` refuses to overwrite a directory holding such files)."""
    root = Path(output_dir)
    removed = []
    for entry in sorted(root.iterdir()):
        if not _is_run_file(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def _main_process() -> bool:
    # the accelerator may not exist yet (or no longer); a launcher sets RANK on every process
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def removed_if_start_fails(output_dir: str | Path) -> Iterator[None]:
    """Undo what the block wrote into ``output_dir`` when it raises before the run's first new
    checkpoint: a config or data error found during set-up leaves no half-made run directory.

    A directory the block created goes as a whole (when it holds nothing but run files); in one
    that existed, only the run files the block added go, and everything that was there stays.
    Once the run has written a checkpoint, nothing is removed (there is progress to resume).

    Example:
        >>> with removed_if_start_fails(cfg.output_dir):
        ...     accelerator = start_run(cfg, cfg.train)
        ...     history = Engine(Task(cfg, accelerator), cfg.train, cfg.output_dir, cfg.seed, accelerator).fit()
    """
    out = Path(output_dir)
    created = not out.exists()
    before = set() if created or not out.is_dir() else {p.name for p in out.iterdir()}
    checkpoints_before = _checkpoint_dirs(out)
    try:
        yield
    except BaseException:
        if _main_process() and out.is_dir() and not (_checkpoint_dirs(out) - checkpoints_before):
            if created:
                if not foreign_entries(out):
                    shutil.rmtree(out, ignore_errors=True)
            else:
                for entry in out.iterdir():
                    if entry.name not in before and _is_run_file(entry.name):
                        if entry.is_dir() and not entry.is_symlink():
                            shutil.rmtree(entry, ignore_errors=True)
                        else:
                            entry.unlink(missing_ok=True)
        raise
