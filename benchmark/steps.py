"""A benchmark cell's step budget and the optimizer steps of its learning-curve points."""

from __future__ import annotations

import math

from mosmos.finetune.config import FinetuneConfig

__all__ = ["curve_steps", "step_cap"]


def step_cap(ft: FinetuneConfig) -> int | None:
    """The optimizer steps a stage 2 run of ``ft`` trains at most, as the engine counts them on one
    process: ``train.max_steps``, else ``train.epochs`` x the full batches of ``data.samples_per_epoch``
    per epoch / ``train.grad_accum``. None when an epoch is the training cases themselves
    (``data.samples_per_epoch`` null), a length known only once the data is read."""
    t = ft.train
    if t.max_steps:
        return t.max_steps
    if ft.data.samples_per_epoch is None:
        return None
    return t.epochs * max(1, (ft.data.samples_per_epoch // t.batch_size) // t.grad_accum)


def curve_steps(cap: int, points: list[float]) -> dict[int, float]:
    """``{optimizer step: share}`` of the learning-curve ``points`` (shares of ``cap``): step
    ``ceil(share x cap)``, at least 1; a share landing on the cap itself (the cell's own score) or on
    the step of a smaller share (a short budget) is left out."""
    out: dict[int, float] = {}
    for share in sorted(points):
        step = max(1, math.ceil(share * cap - 1e-9))  # 0.1 x 30 is 3.0000000000000004, not 4
        if step < cap:
            out.setdefault(step, share)
    return out
