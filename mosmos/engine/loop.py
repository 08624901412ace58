"""The training loop: :class:`Engine` runs a stage's :class:`Task` to its last step.

One flat loop (accelerate-examples style) that runs unchanged on one CPU, one GPU or many
processes: device placement, autocast, gradient accumulation and clipping, checkpoints with exact
resume, TensorBoard logging, a progress bar on the main process, and guards against non-finite
losses and Ctrl-C. It never knows which objective it runs: the task supplies the model, the data
and a step function ``(model, batch) -> {"loss": ...}``.

Exact resume: the sampler's order is a function of (seed, epoch) and augmentation is seeded per
(seed, epoch, sample), so restoring model/optimizer/scheduler/RNG state and skipping the batches
already seen reproduces an uninterrupted run.

Learning curves: ``train.snapshot_steps`` saves the model weights after those optimizer steps
(:meth:`Engine.save_snapshot`), touching no RNG stream, batch or optimizer state, so the run trains
bit for bit as it would without; ``train.stop_after_steps`` ends a run after that many steps with the
schedule of the whole budget, the run a snapshot stands for.

The engine's logs and metrics (loss lines, evaluation, early stop, end-of-run summary) are in
:mod:`mosmos.engine.reporting`; the :class:`Task` contract in :mod:`mosmos.engine.task`.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from mosmos.channels_last import to_channels_last
from mosmos.engine import checkpoints
from mosmos.engine.accelerator import make_accelerator
from mosmos.engine.autotune import choose_channels_last, resolve_num_workers
from mosmos.engine.config import TrainConfig
from mosmos.engine.reporting import ReportingMixin
from mosmos.engine.sampler import make_train_loader
from mosmos.engine.schedule import cosine_with_warmup, make_optimizer
from mosmos.engine.task import Task
from mosmos.errors import MosmosError

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("mosmos")


class Engine(ReportingMixin):
    """Runs a :class:`Task` under an ``accelerate.Accelerator``.

    Example:
        >>> history = Engine(task, cfg.train, cfg.output_dir, seed=cfg.seed).fit()
    """

    def __init__(
        self,
        task: Task,
        cfg: TrainConfig,
        output_dir: str | Path,
        seed: int,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.task, self.cfg, self.seed = task, cfg, seed
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator or make_accelerator(cfg, self.output_dir)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # the state a checkpoint holds
        self.global_step = 0
        self.epoch = 0
        self.batches_done = 0  # micro-batches consumed in the current epoch
        self.history: list[dict] = []
        self.stopped_early = False
        # the state of this process only
        self.interrupted = False
        self.bad_steps = 0  # non-finite steps in a row
        self.running: dict[str, float] = {}  # loss sums since the last log line
        # seconds waiting for the loader and in steps: since the last log line, and in all
        self.timing = {"data_s": 0.0, "step_s": 0.0}
        self.timing_total = {"data_s": 0.0, "step_s": 0.0}

    def fit(self) -> list[dict]:
        """Train to ``total_steps``, evaluating every ``eval_every`` epochs; returns the metric history."""
        acc = self.accelerator
        self._prepare()
        # TensorBoard writes under logs/tb; wandb and mlflow name the project
        acc.init_trackers("tb" if self.cfg.log_with == "tensorboard" else "mosmos")
        checkpoints.remove_stale_temporaries(acc, self.output_dir)
        self.try_resume()
        # every process: under `train.cpu_processes` each rank gets the terminal's Ctrl-C itself, and
        # the ranks agree on stopping after the same step (_stop_requested)
        previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        bar = tqdm(
            total=self.last_step,
            initial=self.global_step,
            disable=not acc.is_local_main_process,
            desc="train",
            dynamic_ncols=True,
        )
        start = time.time()
        try:
            while self.global_step < self.last_step and not self._stop_requested() and not self.stopped_early:
                if self._train_epoch(bar):  # ran to the end of the epoch
                    self.epoch += 1
                    self.batches_done = 0
                    if self.epoch % self.cfg.eval_every == 0:
                        self._evaluate()
                        if self._plateaued():
                            break
        finally:
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        if self.interrupted:
            path = self.save_checkpoint()
            acc.print(
                f"interrupted: saved {path}; run the same command again to continue (train.resume=auto)"
            )
        else:
            self._finish(start)
        acc.end_training()
        return self.history

    # ---------------------------------------------------------------- set-up
    def _prepare(self) -> None:
        """Build the loader, optimizer and schedule, let accelerate place them; set ``total_steps``."""
        cfg, task, acc = self.cfg, self.task, self.accelerator
        self.num_workers = resolve_num_workers(cfg.num_workers, acc.device)
        loader = make_train_loader(
            task.train_dataset,
            cfg.batch_size,
            task.collate_fn,
            self.num_workers,
            self.seed,
            pin_memory=acc.device.type == "cuda",
        )
        self.channels_last = choose_channels_last(
            cfg.channels_last,
            task.model.to(acc.device),
            self._trial_step(),
            self.output_dir,
            reduce_mean=lambda t: acc.reduce(t.to(acc.device), "mean").cpu(),
            is_main_process=acc.is_main_process,
        )
        if self.channels_last:
            to_channels_last(task.model)
        optimizer = make_optimizer(
            task.model,
            cfg.lr,
            cfg.weight_decay,
            getattr(task, "lr_scale", None),
            getattr(task, "freeze_steps", None),
        )
        self.model, self.optimizer, self.loader = self.accelerator.prepare(task.model, optimizer, loader)
        steps_per_epoch = max(1, len(self.loader) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        self.scheduler = cosine_with_warmup(
            self.optimizer, cfg.warmup_steps, self.total_steps, getattr(task, "rewarm_steps", 0)
        )
        # train.stop_after_steps ends the loop early; the schedule above still spans total_steps
        self.last_step = min(self.total_steps, cfg.stop_after_steps or self.total_steps)
        self.snapshot_steps = set(cfg.snapshot_steps)
        # The scheduler's state goes into trainer_state.json, not accelerate's register_for_checkpointing:
        # accelerate reads registered objects back with torch.load(weights_only=False), which would run
        # whatever a tampered checkpoint pickled. Everything else it loads is safetensors or weights_only.

    def _trial_step(self) -> Callable[[torch.nn.Module], torch.Tensor]:
        """The loss of a real training batch (the first items of the training set), as a function of
        the model: what ``train.channels_last: auto`` times."""
        from accelerate.utils import send_to_device

        cache: dict[str, Any] = {}

        def run(model: torch.nn.Module) -> torch.Tensor:
            if "batch" not in cache:
                data, n = self.task.train_dataset, min(self.cfg.batch_size, len(self.task.train_dataset))
                items = [data[i] for i in range(n)]
                batch = self.task.collate_fn(items) if self.task.collate_fn else default_collate(items)
                cache["batch"] = send_to_device(batch, self.accelerator.device)
            with self.accelerator.autocast():
                return self.task.step(model, cache["batch"])["loss"]

        return run

    # ----------------------------------------------------------------- loop
    def _train_epoch(self, bar: tqdm) -> bool:
        """Train on the rest of the current epoch; False when training stopped inside it (last step
        reached or interrupted)."""
        acc, cfg = self.accelerator, self.cfg
        # accelerate's loaders re-seed their sampler with their own iteration counter on every pass,
        # so the epoch is set on the loader (it forwards to EpochSampler.set_epoch)
        if hasattr(self.task.train_dataset, "set_epoch"):
            self.task.train_dataset.set_epoch(self.epoch)
        loader = acc.skip_first_batches(self.loader, self.batches_done) if self.batches_done else self.loader
        loader.set_epoch(self.epoch)
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            fetched = time.perf_counter()
            losses, fault = self._step(batch)
            self._time(fetched - start, time.perf_counter() - fetched)
            self.batches_done += 1
            if fault is not None:
                self._skip_faulty_step(fault)
                continue
            self.bad_steps = 0
            for k, v in losses.items():
                self.running[k] = self.running.get(k, 0.0) + float(v.detach())
            if not acc.sync_gradients:  # inside a gradient accumulation
                continue
            self.global_step += 1
            bar.update(1)
            if self.global_step in self.snapshot_steps:
                self.save_snapshot()
            if self.global_step % cfg.log_every == 0:
                self._log(bar)
            if self.global_step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if self.global_step >= self.last_step or self._stop_requested():
                return False
        return True

    def _step(self, batch: Any) -> tuple[dict[str, torch.Tensor], str | None]:
        """Forward and backward one micro-batch, and step the optimizer at the end of an accumulation.
        Returns the losses and what was non-finite ("loss", "gradient" or None); nothing is updated then."""
        acc = self.accelerator
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
        return losses, fault

    def _time(self, data_s: float, step_s: float) -> None:
        for record in (self.timing, self.timing_total):
            record["data_s"] += data_s
            record["step_s"] += step_s

    @property
    def data_wait_share(self) -> float:
        """Share of the training wall time spent waiting for batches, over the whole run so far."""
        total = self.timing_total["data_s"] + self.timing_total["step_s"]
        return self.timing_total["data_s"] / total if total > 0 else 0.0

    def _skip_faulty_step(self, fault: str) -> None:
        """Count a skipped step; ``max_bad_steps`` in a row save the last good state and stop the run."""
        cfg = self.cfg
        self.bad_steps += 1
        if self.accelerator.is_main_process:
            logger.warning(
                "non-finite %s at step %d (epoch %d, batch %d); step skipped (%d in a row)",
                fault,
                self.global_step + 1,
                self.epoch,
                self.batches_done,
                self.bad_steps,
            )
        if self.bad_steps >= cfg.max_bad_steps:
            path = self.save_checkpoint()
            raise MosmosError(
                f"{self.bad_steps} consecutive non-finite losses or gradients at step "
                f"{self.global_step + 1}: the learning rate (train.lr={cfg.lr}) is likely too "
                f"high or the precision (train.mixed_precision={cfg.mixed_precision}) too low, "
                f"or the data holds NaN/inf (run `mosmos check`); the last good state is "
                f"saved in {path}"
            )

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

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # First Ctrl-C: finish the current step, save a checkpoint, stop cleanly. A second one stops
        # at once (the last complete checkpoint stays usable: saves are atomic).
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        if self.accelerator.is_main_process:
            print(
                "\ninterrupt: saving a checkpoint after this step (Ctrl-C again to stop at once)", flush=True
            )

    def _stop_requested(self) -> bool:
        """Whether to stop after this step for a Ctrl-C: on several processes, when any of them got
        one (a signal reaches the ranks at different moments; all must stop after the same step).
        On CPU ranks only (`train.cpu_processes`): GPU runs under a launcher are stopped by it, and a
        per-step host sync would stall the GPU."""
        acc = self.accelerator
        if acc.num_processes > 1 and acc.device.type == "cpu":
            # accelerate's trigger, as _plateaued uses it: set on any process, seen (and reset) by all
            if self.interrupted:
                acc.set_trigger()
            self.interrupted = acc.check_trigger()
        return self.interrupted

    # ---------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` atomically and prune old ones (:func:`checkpoints.save`)."""
        state = {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "history": self.history,
            "stopped_early": self.stopped_early,
            "seed": self.seed,
            "scheduler": checkpoints.scheduler_state(self.scheduler),
        }
        return checkpoints.save(self.accelerator, self.output_dir, state, self.cfg.keep_checkpoints)

    def save_snapshot(self) -> Path:
        """Write the model weights after this step to ``snapshots/step_<k>`` (``train.snapshot_steps``),
        in the task's own format (its ``save_snapshot``, else ``model.safetensors``). It only reads
        the weights: no RNG stream, batch, optimizer or scheduler state moves."""
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        write = getattr(self.task, "save_snapshot", None)

        def fill(folder: Path) -> None:
            if write is not None:
                write(model, folder)
            else:
                checkpoints.write_weights(model, folder)

        return checkpoints.save_snapshot(acc, self.output_dir, self.global_step, fill)

    def try_resume(self) -> bool:
        """Continue from the newest usable checkpoint ``train.resume`` names; False when there is
        none to resume from (:func:`checkpoints.load_newest` says which are skipped and why)."""
        found = checkpoints.load_newest(self.accelerator, self.cfg.resume, self.output_dir)
        if found is None:
            return False
        path, state = found
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.batches_done = state["batches_done"]
        self.history = state.get("history", [])
        self.stopped_early = bool(state.get("stopped_early", False))
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        self.accelerator.print(f"resumed from {path} at step {self.global_step} (epoch {self.epoch})")
        return True
