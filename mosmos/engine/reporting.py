"""The logs and metrics of :class:`~mosmos.engine.loop.Engine`: loss lines, evaluation, the early stop
on a plateau and the end-of-run summary.

:class:`ReportingMixin` holds these methods of the engine; it reads the state
:class:`~mosmos.engine.loop.Engine` sets up (``accelerator``, ``cfg``, ``task``, ``history``,
``global_step`` ...).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from mosmos.engine import checkpoints
from mosmos.engine.images import log_images
from mosmos.io import write_json

__all__ = ["ReportingMixin"]


class ReportingMixin:
    """Logs and metrics of :class:`~mosmos.engine.loop.Engine` (a base class of it, never used alone)."""

    def _log(self, bar: tqdm) -> None:
        """Mean losses since the last log line and the learning rate, to TensorBoard and the bar."""
        n = self.cfg.log_every * self.cfg.grad_accum
        logs = {f"train/{k}": v / n for k, v in self.running.items()}
        logs["train/lr"] = self.scheduler.get_last_lr()[0]
        # what the loader costs: a share near 0 means the model, not the data, sets the pace
        elapsed = self.timing["data_s"] + self.timing["step_s"]
        if elapsed > 0:
            logs["perf/data_wait_share"] = self.timing["data_s"] / elapsed
            logs["perf/seconds_per_step"] = elapsed / self.cfg.log_every
        self.timing = {"data_s": 0.0, "step_s": 0.0}
        self.accelerator.log(logs, step=self.global_step)
        bar.set_postfix(
            {
                k.split("/")[1]: f"{v:.3f}"
                for k, v in logs.items()
                if k.startswith("train/") and k != "train/lr"
            }
        )
        self.running = {}

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
            log_images(acc, getattr(self.task, "eval_images", None) or {}, self.global_step)
            write_json(self.output_dir / "metrics.json", {"history": self.history, "final": record})
            # per-organ entries ("pointing_game/liver") go to TensorBoard and metrics.json only
            acc.print(
                "eval "
                + " ".join(
                    f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "/" not in k
                )
            )
        acc.wait_for_everyone()

    def _plateaued(self) -> bool:
        """``train.early_stopping_patience`` evaluations in a row without a new best of the task's
        ``monitor`` metric (decided on the main process, which holds the history; every process
        then stops at the same step)."""
        patience, metric = self.cfg.early_stopping_patience, getattr(self.task, "monitor", None)
        if patience is None or metric is None:
            return False
        acc = self.accelerator
        if acc.is_main_process:
            values = [h[metric] for h in self.history if isinstance(h.get(metric), (int, float))]
            finite = [v if v == v else float("-inf") for v in values]  # NaN never counts as a best
            if finite and len(finite) - 1 - max(range(len(finite)), key=finite.__getitem__) >= patience:
                acc.set_trigger()
        if acc.check_trigger():
            self.stopped_early = True
            acc.print(
                f"early stop at step {self.global_step}: {patience} evaluation(s) without a better {metric}"
            )
            return True
        return False

    def _finish(self, start: float) -> None:
        """The final evaluation and checkpoint, unless the last step already has them."""
        if not self.history or self.history[-1]["step"] != self.global_step:
            self._evaluate()
        latest = checkpoints.list_checkpoints(self.output_dir)
        if not latest or latest[0].name != checkpoints.checkpoint_name(self.global_step):
            self.save_checkpoint()
        if self.last_step < self.total_steps and self.global_step == self.last_step:
            self.accelerator.print(
                f"stopped after {self.global_step} of {self.total_steps} steps (train.stop_after_steps)"
            )
        self.accelerator.print(
            f"done: {self.global_step} steps in {time.time() - start:.0f}s "
            f"({self.data_wait_share:.1%} of the training time waiting for data, "
            f"{self.num_workers} loader worker(s), "
            f"{'channels-last' if self.channels_last else 'default'} layout)"
        )
