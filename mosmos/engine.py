"""The training engine shared by both stages, on Hugging Face Accelerate.

One flat loop (accelerate-examples style) that runs unchanged on one CPU, one GPU or many
processes: device placement, autocast, gradient accumulation and clipping, AdamW with warmup +
cosine decay, checkpoints with exact resume, TensorBoard logging, a progress bar on the main
process, and guards against non-finite losses and Ctrl-C. It never knows which objective it runs:
a :class:`Task` supplies the model, the data and a step function ``(model, batch) -> {"loss": ...}``.

Exact resume: the sampler's order is a function of (seed, epoch) and augmentation is seeded per
(seed, epoch, sample), so restoring model/optimizer/scheduler/RNG state with
``accelerator.load_state`` and skipping the batches already seen reproduces an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mosmos.channels_last import to_channels_last
from mosmos.errors import ConfigError, MosmosError
from mosmos.io import write_json

logger = logging.getLogger("mosmos")

CHECKPOINT_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainConfig:
    """The ``train`` section every stage shares."""

    epochs: int = 10  # passes over the training set
    max_steps: int | None = None  # optimizer steps; when set, overrides epochs
    batch_size: int = 8  # per process
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not applied to norms/biases)
    warmup_steps: int = 50  # linear warmup, then cosine decay to 0
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = 1.0  # max gradient norm; null disables
    # autocast: fp16 on GPUs; bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX, see
    # resolve_mixed_precision), elsewhere full precision
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    num_workers: int = 0  # DataLoader workers per process
    checkpoint_every: int = 200  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    resume: str | None = None  # "latest", a checkpoint directory, or null
    log_every: int = 10  # optimizer steps between log lines / TensorBoard points
    eval_every: int = 1  # epochs between evaluations
    max_bad_steps: int = 5  # consecutive non-finite steps before the run aborts
    deterministic: bool = False  # torch deterministic algorithms (for exact-resume checks)
    # store convolution weights channels-last (NDHWC): faster 3D convolutions on CPU (oneDNN) and on
    # recent GPUs; same numbers up to float rounding, same checkpoints (mosmos.channels_last)
    channels_last: bool = False

    def validate(self) -> None:
        checks = {
            "train.epochs": self.epochs >= 1,
            "train.batch_size": self.batch_size >= 1,
            "train.lr": self.lr > 0,
            "train.weight_decay": self.weight_decay >= 0,
            "train.warmup_steps": self.warmup_steps >= 0,
            "train.grad_accum": self.grad_accum >= 1,
            "train.num_workers": self.num_workers >= 0,
            "train.checkpoint_every": self.checkpoint_every >= 1,
            "train.keep_checkpoints": self.keep_checkpoints >= 1,
            "train.log_every": self.log_every >= 1,
            "train.eval_every": self.eval_every >= 1,
            "train.max_bad_steps": self.max_bad_steps >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key.split('.')[1])!r} is out of range")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps={self.max_steps} must be >= 1 or null")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"train.clip_grad={self.clip_grad} must be > 0 or null")


class Task(Protocol):
    """What a stage hands the engine."""

    model: torch.nn.Module
    train_dataset: Dataset
    collate_fn: Callable | None

    def step(self, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Named losses for one batch, with the total under ``"loss"``."""

    def evaluate(self, model: torch.nn.Module, epoch: int) -> dict[str, float]:
        """Validation metrics (runs on the main process, model unwrapped)."""


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), so resume is exact."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def parameter_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr_scale: dict[str, float] | None = None,
    freeze_steps: dict[str, int] | None = None,
):
    """AdamW groups: no decay on biases, norms, temperatures and queries; optional per-prefix lr scale
    and per-prefix number of initial steps during which the group's learning rate is 0 (frozen)."""
    groups: dict[tuple[bool, float, int], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or "logit_scale" in name
        scale, frozen = 1.0, 0
        for prefix, s in (lr_scale or {}).items():
            if name.startswith(prefix):
                scale = s
        for prefix, n in (freeze_steps or {}).items():
            if name.startswith(prefix):
                frozen = n
        groups.setdefault((no_decay, scale, frozen), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if nd else weight_decay, "lr_scale": scale, "freeze_steps": frozen}
        for (nd, scale, frozen), ps in groups.items()
    ]


def _cosine_with_warmup(optimizer, warmup: int, total: int):
    # transformers' get_cosine_schedule_with_warmup does this too, but it ignores per-group scales.
    # A group frozen for its first N steps gets lr 0 there (AdamW with lr 0 leaves weights unchanged,
    # decoupled weight decay included), then warms up and decays with the others. Freezing through the
    # schedule rather than requires_grad keeps the optimizer and DDP set-up fixed and resume exact.
    def factor(step: int, frozen: int) -> float:
        if step < frozen:
            return 0.0
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def group_lambda(group: dict) -> Callable[[int], float]:
        scale, frozen = group.get("lr_scale", 1.0), group.get("freeze_steps", 0)
        return lambda s: scale * factor(s, frozen)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [group_lambda(g) for g in optimizer.param_groups])


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), reverse=True)


def _scheduler_state(scheduler) -> dict:
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


def start_run(cfg: Any, train: TrainConfig):
    """Seed, create the Accelerator and, on the main process, the run directory with the resolved
    config and library versions (what every stage writes before training). Returns the Accelerator."""
    from accelerate.utils import set_seed

    from mosmos.config import dump_config
    from mosmos.io import atomic_write_text, library_versions

    output_dir = Path(cfg.output_dir)
    set_seed(cfg.seed)
    accelerator = Engine.make_accelerator(train, output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "config.yaml", dump_config(cfg))
        write_json(output_dir / "versions.json", library_versions())
    return accelerator


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 kernels natively here (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_mixed_precision(requested: str, cuda: bool | None = None, cpu_bf16: bool | None = None) -> str:
    """The autocast precision a run gets: ``requested`` on a GPU; on a CPU, bf16 only where it is native.

    fp16 autocast on CPUs is slow and needs loss scaling, so it falls back to full precision there;
    bf16 on a CPU with AVX512-BF16/AMX takes the demo encoder's training step to 0.8x the float32
    time (benchmarks/bench_train_step.py --compare bf16).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda or requested == "no":
        return requested
    if requested == "bf16" and (cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16):
        return "bf16"
    return "no"


class Engine:
    """Runs a :class:`Task` under an ``accelerate.Accelerator``."""

    @staticmethod
    def make_accelerator(cfg: TrainConfig, output_dir: str | Path):
        """The Accelerator a run uses (mixed precision as :func:`resolve_mixed_precision` allows)."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration

        precision = resolve_mixed_precision(cfg.mixed_precision)
        if precision != cfg.mixed_precision:
            logger.info(
                "train.mixed_precision=%s: no GPU%s, training in float32",
                cfg.mixed_precision,
                " and no native bf16 on this CPU" if cfg.mixed_precision == "bf16" else "",
            )
        if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
            # One process may train several runs (the benchmark's cells, a notebook). Accelerate keeps
            # the first run's precision for the whole process and refuses another with a ValueError;
            # start its per-run state afresh (the process group, in PartialState, is kept).
            AcceleratorState._reset_state()

        # Under `accelerate launch --multi_gpu` on a machine without CUDA, Accelerate only forms a
        # (gloo) process group when asked for the CPU explicitly; otherwise each process runs alone.
        distributed_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        return Accelerator(
            cpu=distributed_cpu,
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision=precision,
            log_with="tensorboard",
            project_config=ProjectConfiguration(
                project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")
            ),
        )

    def __init__(self, task: Task, cfg: TrainConfig, output_dir: str | Path, seed: int, accelerator=None):
        self.task, self.cfg, self.seed = task, cfg, seed
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator or self.make_accelerator(cfg, self.output_dir)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.global_step = 0
        self.epoch = 0
        self.batches_done = 0  # micro-batches consumed in the current epoch
        self.history: list[dict] = []
        self.interrupted = False

    # ---------------------------------------------------------------- set-up
    def _prepare(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.sampler = EpochSampler(len(self.task.train_dataset), self.seed)
        loader = DataLoader(
            self.task.train_dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            collate_fn=self.task.collate_fn,
            num_workers=cfg.num_workers,
            drop_last=True,
            # its own generator: creating an iterator draws a worker seed from it, and drawing from the
            # global RNG would make dropout after a resume differ from the uninterrupted run
            generator=torch.Generator().manual_seed(self.seed),
        )
        if len(loader) == 0:
            raise MosmosError(
                f"the training set has {len(self.task.train_dataset)} cases, fewer than one batch "
                f"(train.batch_size={cfg.batch_size}); lower the batch size or add data"
            )
        groups = parameter_groups(
            self.task.model,
            cfg.weight_decay,
            getattr(self.task, "lr_scale", None),
            getattr(self.task, "freeze_steps", None),
        )
        if cfg.channels_last:
            to_channels_last(self.task.model)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.model, self.optimizer, self.loader = acc.prepare(self.task.model, optimizer, loader)
        self.steps_per_epoch = max(1, len(self.loader) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.scheduler = _cosine_with_warmup(self.optimizer, cfg.warmup_steps, self.total_steps)
        # The scheduler's state goes into trainer_state.json, not accelerate's register_for_checkpointing:
        # accelerate reads registered objects back with torch.load(weights_only=False), which would run
        # whatever a tampered checkpoint pickled. Everything else it loads is safetensors or weights_only.

    # ---------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` atomically (temp dir, fsync, rename) and prune old ones."""
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.global_step:08d}"
        tmp = root / f".tmp_{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        # save_state ends without a barrier: wait until every rank has written its random_states_R.pkl
        # before the main process hashes, fsyncs and renames the directory
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "global_step": self.global_step,
                "epoch": self.epoch,
                "batches_done": self.batches_done,
                "history": self.history,
                "seed": self.seed,
                "scheduler": _scheduler_state(self.scheduler),
                # what accelerate wrote: a file damaged later but still parseable (same size, bytes
                # changed) would otherwise load silently; resume checks these first
                "checksums": _checksums(tmp),
            }
            (tmp / STATE_FILE).write_text(json.dumps(state))
            (tmp / COMPLETE_MARKER).write_text("ok\n")
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(root)  # the rename itself survives a power loss
            for old in list_checkpoints(self.output_dir)[self.cfg.keep_checkpoints :]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _remove_stale_temporaries(self) -> None:
        """Half-written ``.tmp_step_N`` folders of a killed save are never loaded; remove them."""
        acc = self.accelerator
        if acc.is_main_process:
            for tmp in (self.output_dir / "checkpoints").glob(f".tmp_{CHECKPOINT_PREFIX}*"):
                logger.info("removing %s, left by an interrupted save", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()

    def _resolve_resume(self) -> list[Path]:
        resume = self.cfg.resume
        if not resume:
            return []
        if resume == "latest":
            return list_checkpoints(self.output_dir)
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"train.resume={resume!r}: no such checkpoint directory (or use 'latest')")
        return [path]

    def try_resume(self) -> bool:
        """Load the newest usable checkpoint; a corrupt or partial one is skipped with a warning and
        renamed ``unusable_step_N`` (kept for inspection, never pruned in place of a good one)."""
        unusable: list[Path] = []
        try:
            return self._load_newest_usable(unusable)
        finally:
            self._set_aside(unusable)

    def _set_aside(self, unusable: list[Path]) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()  # every process has looked at them before they move
        if acc.is_main_process and self.cfg.resume == "latest":
            for ckpt in unusable:
                target = ckpt.with_name(f"unusable_{ckpt.name}")
                shutil.rmtree(target, ignore_errors=True)
                os.replace(ckpt, target)
                logger.warning("moved the unusable checkpoint %s to %s", ckpt, target)
        acc.wait_for_everyone()

    def _load_newest_usable(self, unusable: list[Path]) -> bool:
        for ckpt in self._resolve_resume():
            if not (ckpt / COMPLETE_MARKER).is_file() or not (ckpt / STATE_FILE).is_file():
                logger.warning("checkpoint %s is incomplete; falling back to the previous one", ckpt)
                unusable.append(ckpt)
                continue
            try:
                state = json.loads((ckpt / STATE_FILE).read_text())
                damaged = [
                    name
                    for name, digest in state.get("checksums", {}).items()
                    if not (ckpt / name).is_file() or _sha256(ckpt / name) != digest
                ]
                if damaged:
                    raise MosmosError(f"{', '.join(damaged)} changed since the checkpoint was written")
                self.accelerator.load_state(str(ckpt))
            except Exception as exc:  # any failure to read means this checkpoint is unusable
                logger.warning(
                    "checkpoint %s could not be loaded (%s); falling back to the previous one", ckpt, exc
                )
                unusable.append(ckpt)
                continue
            self.global_step = state["global_step"]
            self.epoch = state["epoch"]
            self.batches_done = state["batches_done"]
            self.history = state.get("history", [])
            if "scheduler" in state:
                self.scheduler.load_state_dict(state["scheduler"])
            self.accelerator.print(f"resumed from {ckpt} at step {self.global_step} (epoch {self.epoch})")
            return True
        if self.cfg.resume and self.cfg.resume != "latest":
            raise MosmosError(
                f"could not resume from {self.cfg.resume}: the checkpoint is incomplete or corrupt"
            )
        if unusable:
            # a failed load may have changed part of the model already: starting over from it would
            # not be a fresh start, and silently discarding every checkpoint loses the run's progress
            raise MosmosError(
                f"no usable checkpoint in {self.output_dir / 'checkpoints'}: "
                f"{', '.join(p.name for p in unusable)} could not be loaded (they are set aside as "
                "unusable_*); rerun to start from scratch"
            )
        return False

    # ----------------------------------------------------------------- loop
    def _all_finite(self, value: torch.Tensor) -> bool:
        """True on every process when ``value`` is finite on every process (all take the same branch)."""
        flag = torch.isfinite(value).all().float().reshape(1).to(self.accelerator.device)
        return self.accelerator.reduce(flag, "min").item() > 0

    def _gradients_finite(self) -> bool:
        """Clip (when configured) and tell whether the gradient norm is finite. Under fp16 the GradScaler
        owns this check (it skips inf steps and lowers its scale), so it is never counted as a fault."""
        acc, cfg = self.accelerator, self.cfg
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.clip_grad:
            norm = acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        elif params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        else:
            return True
        if acc.scaler is not None or norm is None:  # None: a backend (DeepSpeed) that clips internally
            return True
        return self._all_finite(torch.as_tensor(norm).detach())

    def _on_sigint(self, signum, frame) -> None:
        # First Ctrl-C: finish the current step, save a checkpoint, stop cleanly. A second one stops
        # at once (the last complete checkpoint stays usable: saves are atomic).
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to stop at once)", flush=True)

    def _evaluate(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            was_training = model.training
            model.eval()
            with torch.no_grad():
                metrics = self.task.evaluate(model, self.epoch)
            model.train(was_training)
            record = {"epoch": self.epoch, "step": self.global_step, **metrics}
            self.history.append(record)
            acc.log(
                {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                step=self.global_step,
            )
            write_json(self.output_dir / "metrics.json", {"history": self.history, "final": record})
            # per-organ entries ("pointing_game/liver") go to TensorBoard and metrics.json only
            acc.print(
                "eval "
                + " ".join(
                    f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "/" not in k
                )
            )
        acc.wait_for_everyone()

    def fit(self) -> list[dict]:
        """Train to ``total_steps``, evaluating every ``eval_every`` epochs; returns the metric history."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        self._prepare()
        acc.init_trackers("tb")
        self._remove_stale_temporaries()
        self.try_resume()
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint) if acc.is_main_process else None
        bar = tqdm(
            total=self.total_steps,
            initial=self.global_step,
            disable=not acc.is_local_main_process,
            desc="train",
            dynamic_ncols=True,
        )
        bad_steps, running, t0 = 0, {}, time.time()
        try:
            while self.global_step < self.total_steps and not self.interrupted:
                # accelerate's loaders re-seed their sampler with their own iteration counter on every
                # pass, so the epoch is set on the loader (it forwards to EpochSampler.set_epoch)
                if hasattr(self.task.train_dataset, "set_epoch"):
                    self.task.train_dataset.set_epoch(self.epoch)
                loader = self.loader
                if self.batches_done:
                    loader = acc.skip_first_batches(self.loader, self.batches_done)
                loader.set_epoch(self.epoch)
                for batch in loader:
                    with acc.accumulate(self.model):
                        losses = self.task.step(self.model, batch)
                        loss = losses["loss"]
                        fault = None if self._all_finite(loss.detach()) else "loss"
                        if fault is None:
                            acc.backward(loss)
                            if acc.sync_gradients and not self._gradients_finite():
                                fault = "gradient"
                        if fault is None:
                            self.optimizer.step()  # accelerate skips it between accumulation steps
                            if acc.sync_gradients:
                                self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    self.batches_done += 1
                    if fault is not None:
                        bad_steps += 1
                        if acc.is_main_process:
                            logger.warning(
                                "non-finite %s at step %d (epoch %d, batch %d); step skipped (%d in a row)",
                                fault,
                                self.global_step + 1,
                                self.epoch,
                                self.batches_done,
                                bad_steps,
                            )
                        if bad_steps >= cfg.max_bad_steps:
                            path = self.save_checkpoint()
                            raise MosmosError(
                                f"{bad_steps} consecutive non-finite losses or gradients at step "
                                f"{self.global_step + 1}: the learning rate (train.lr={cfg.lr}) is likely too "
                                f"high or the precision (train.mixed_precision={cfg.mixed_precision}) too low, "
                                f"or the data holds NaN/inf (run `mosmos check`); the last good state is "
                                f"saved in {path}"
                            )
                        continue
                    bad_steps = 0
                    for k, v in losses.items():
                        running[k] = running.get(k, 0.0) + float(v.detach())
                    if not acc.sync_gradients:
                        continue
                    self.global_step += 1
                    bar.update(1)
                    if self.global_step % cfg.log_every == 0:
                        n = cfg.log_every * cfg.grad_accum
                        logs = {f"train/{k}": v / n for k, v in running.items()}
                        logs["train/lr"] = self.scheduler.get_last_lr()[0]
                        acc.log(logs, step=self.global_step)
                        bar.set_postfix(
                            {k.split("/")[1]: f"{v:.3f}" for k, v in logs.items() if k != "train/lr"}
                        )
                        running = {}
                    if self.global_step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.global_step >= self.total_steps or self.interrupted:
                        break
                else:
                    self.epoch += 1
                    self.batches_done = 0
                    if self.epoch % cfg.eval_every == 0:
                        self._evaluate()
                    continue
        finally:
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        if self.interrupted:
            path = self.save_checkpoint()
            acc.print(f"interrupted: saved {path}; continue with train.resume=latest")
            acc.end_training()
            return self.history
        if not self.history or self.history[-1]["step"] != self.global_step:
            self._evaluate()
        latest = list_checkpoints(self.output_dir)
        if not latest or latest[0].name != f"{CHECKPOINT_PREFIX}{self.global_step:08d}":
            self.save_checkpoint()
        acc.print(f"done: {self.global_step} steps in {time.time() - t0:.0f}s")
        acc.end_training()
        return self.history
