"""The contract between a stage and the engine: the :class:`Task` a stage hands
:class:`~mosmos.engine.loop.Engine`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

__all__ = ["Task"]


class Task(Protocol):
    """What a stage hands the engine (optionally also ``lr_scale`` and ``freeze_steps``, by
    parameter-name prefix: see :func:`mosmos.engine.schedule.parameter_groups`, and ``rewarm_steps``:
    see :func:`mosmos.engine.schedule.cosine_with_warmup`; ``monitor``:
    the validation metric, higher is better, that ``train.early_stopping_patience`` watches; and
    ``eval_images``: ``{tag: [H, W, 3] array}`` the last ``evaluate`` drew, logged to TensorBoard; and
    ``save_snapshot(model, folder)``: the task's own weight files, written into a ``train.snapshot_steps``
    snapshot, by default :func:`mosmos.engine.checkpoints.write_weights`)."""

    model: torch.nn.Module
    train_dataset: Dataset
    collate_fn: Callable | None

    def step(self, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Named losses for one batch, with the total under ``"loss"``."""

    def evaluate(self, model: torch.nn.Module, epoch: int) -> dict[str, float]:
        """Validation metrics (runs on the main process, model unwrapped)."""
