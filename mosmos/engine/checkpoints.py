"""Checkpoints a run can be killed around: atomic saves, checksums, and resume that falls back.

A checkpoint is ``OUTPUT_DIR/checkpoints/step_N``: what ``accelerator.save_state`` writes (model and
optimizer as safetensors, one RNG state file per process) plus ``trainer_state.json`` (counters,
metric history, the LR scheduler, and a sha256 of every file above) and a ``COMPLETE`` marker. It is
written under a temporary name, fsynced and renamed, so a kill at any moment leaves either the
whole checkpoint or none. Resume takes the newest checkpoint whose files are complete and unchanged;
one that is not is set aside as ``unusable_step_N`` (kept for inspection, never pruned in place of a
good one) and the previous one is tried.

A snapshot (``train.snapshot_steps``) is lighter: ``OUTPUT_DIR/snapshots/step_<k>`` holds the model
weights after optimizer step ``k`` in the stage's own weight format (what the task's
``save_snapshot`` writes; by default ``model.safetensors``), written the same atomic way and never
pruned. It is not something to resume from, only to score: the points of a learning curve.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mosmos.errors import ConfigError, MosmosError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LRScheduler

logger = logging.getLogger("mosmos")

CHECKPOINT_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
SNAPSHOT_DIR = "snapshots"
WEIGHTS_FILE = "model.safetensors"  # a snapshot's weights where the task has no save_snapshot


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after optimizer step ``step``."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), reverse=True)


def scheduler_state(scheduler: LRScheduler) -> dict:
    """The scheduler's state as JSON-ready numbers (it goes into ``trainer_state.json``)."""
    # LambdaLR stores its lambdas as None (they are plain functions); the rest is numbers, which JSON
    # holds exactly.
    state = scheduler.state_dict()
    json.dumps(state)  # fails loudly here, not at resume, if a scheduler ever holds something else
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksums(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative name."""
    return {f.relative_to(path).as_posix(): _sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save(accelerator: Accelerator, output_dir: Path, state: dict, keep: int) -> Path:
    """Write ``checkpoints/step_N`` atomically (temp dir, fsync, rename) and prune all but ``keep``.

    Every process calls it. ``state`` is the trainer state (``global_step`` names the folder);
    the main process adds the checksums of what accelerate wrote and stores it as ``trainer_state.json``.
    """
    root = output_dir / "checkpoints"
    final = root / checkpoint_name(state["global_step"])
    tmp = root / f".tmp_{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    # save_state ends without a barrier: wait until every rank has written its random_states_R.pkl
    # before the main process hashes, fsyncs and renames the directory
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # what accelerate wrote: a file damaged later but still parseable (same size, bytes changed)
        # would otherwise load silently; resume checks these first
        (tmp / STATE_FILE).write_text(json.dumps({**state, "checksums": _checksums(tmp)}))
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)  # the rename itself survives a power loss
        for old in list_checkpoints(output_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def remove_stale_temporaries(accelerator: Accelerator, output_dir: Path) -> None:
    """Half-written ``.tmp_step_N`` folders of a killed save (checkpoint or snapshot) are never
    loaded; remove them."""
    if accelerator.is_main_process:
        for folder in ("checkpoints", SNAPSHOT_DIR):
            for tmp in (output_dir / folder).glob(f".tmp_{CHECKPOINT_PREFIX}*"):
                logger.info("removing %s, left by an interrupted save", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()


def snapshot_path(output_dir: str | Path, step: int) -> Path:
    """The folder of the snapshot taken after optimizer step ``step`` (``snapshots/step_<k>``)."""
    return Path(output_dir) / SNAPSHOT_DIR / f"{CHECKPOINT_PREFIX}{step}"


def list_snapshots(output_dir: str | Path) -> dict[int, Path]:
    """Complete snapshots of a run, by optimizer step, in step order."""
    root = Path(output_dir) / SNAPSHOT_DIR
    if not root.is_dir():
        return {}
    found = {
        int(p.name[len(CHECKPOINT_PREFIX) :]): p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    }
    return dict(sorted(found.items()))


def write_weights(model: torch.nn.Module, directory: Path) -> None:
    """A snapshot of a task without ``save_snapshot``: the model's state dict as ``model.safetensors``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))


def save_snapshot(
    accelerator: Accelerator, output_dir: Path, step: int, write: Callable[[Path], None]
) -> Path:
    """Write ``snapshots/step_<step>`` atomically: ``write(folder)`` fills a temporary folder on the
    main process, which is fsynced and renamed (an earlier snapshot of that step, from a run that
    was killed and resumed before it, is replaced: the weights are the same)."""
    final = snapshot_path(output_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    accelerator.wait_for_everyone()
    return final


def _candidates(resume: str | None, output_dir: Path) -> list[Path]:
    if not resume:
        return []
    if resume in ("latest", "auto"):  # auto: start_run has checked that the checkpoints are this run's
        return list_checkpoints(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(
            f"train.resume={resume!r}: no such checkpoint directory (or use 'auto' or 'latest')"
        )
    return [path]


def _load(accelerator: Accelerator, ckpt: Path) -> dict | None:
    """Load ``ckpt`` into the prepared objects and return its trainer state; None (with a warning)
    when it is incomplete, damaged or unreadable."""
    if not (ckpt / COMPLETE_MARKER).is_file() or not (ckpt / STATE_FILE).is_file():
        logger.warning("checkpoint %s is incomplete; falling back to the previous one", ckpt)
        return None
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
        damaged = [
            name
            for name, digest in state.get("checksums", {}).items()
            if not (ckpt / name).is_file() or _sha256(ckpt / name) != digest
        ]
        if damaged:
            raise MosmosError(f"{', '.join(damaged)} changed since the checkpoint was written")
        accelerator.load_state(str(ckpt))
    except Exception as exc:  # any failure to read means this checkpoint is unusable
        logger.warning("checkpoint %s could not be loaded (%s); falling back to the previous one", ckpt, exc)
        return None
    return state


def _set_aside(accelerator: Accelerator, unusable: list[Path], move: bool) -> None:
    accelerator.wait_for_everyone()  # every process has looked at them before they move
    if accelerator.is_main_process and move:
        for ckpt in unusable:
            target = ckpt.with_name(f"unusable_{ckpt.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(ckpt, target)
            logger.warning("moved the unusable checkpoint %s to %s", ckpt, target)
    accelerator.wait_for_everyone()


def load_newest(accelerator: Accelerator, resume: str | None, output_dir: Path) -> tuple[Path, dict] | None:
    """Load the newest usable checkpoint that ``train.resume`` names into the prepared objects.

    Args:
        accelerator: holds the prepared model and optimizer the checkpoint is loaded into.
        resume: ``train.resume``: "latest" or "auto" (the run's checkpoints, newest first: what
            "auto" may continue is :func:`mosmos.engine.rundir.plan_run_dir`'s decision), a
            checkpoint directory, or None.
        output_dir: the run directory.

    Returns:
        The checkpoint and its trainer state, or None when there is nothing to resume.

    Raises:
        MosmosError: the named checkpoint, or every checkpoint of the run, is unusable.
    """
    unusable: list[Path] = []
    try:
        for ckpt in _candidates(resume, output_dir):
            state = _load(accelerator, ckpt)
            if state is not None:
                return ckpt, state
            unusable.append(ckpt)
        if resume and resume not in ("latest", "auto"):
            raise MosmosError(f"could not resume from {resume}: the checkpoint is incomplete or corrupt")
        if unusable:
            # a failed load may have changed part of the model already: starting over from it would
            # not be a fresh start, and silently discarding every checkpoint loses the run's progress
            raise MosmosError(
                f"no usable checkpoint in {output_dir / 'checkpoints'}: "
                f"{', '.join(p.name for p in unusable)} could not be loaded (they are set aside as "
                "unusable_*); rerun to start from scratch"
            )
        return None
    finally:
        # only the run's own are set aside: a directory named by hand stays where the user put it
        _set_aside(accelerator, unusable, move=resume in ("latest", "auto"))
