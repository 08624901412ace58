"""The training engine shared by both stages, on Hugging Face Accelerate.

A stage builds a :class:`Task` (model, data, ``step(model, batch) -> {"loss": ...}``), calls
:func:`start_run` and ``Engine(task, cfg.train, ...).fit()``. The modules, one concern each:

- ``task``: :class:`Task`, what a stage hands the engine.
- ``loop``: :class:`Engine`, the training loop (accumulation, clipping, non-finite guards, Ctrl-C,
  checkpoints and resume).
- ``reporting``: the engine's logging, evaluation, early stop and end-of-run summary.
- ``checkpoints``: atomic saves, checksums, resume that falls back past a corrupt checkpoint.
- ``schedule``: AdamW parameter groups and the warmup + cosine learning rate.
- ``sampler``: the (seed, epoch)-determined data order that makes resume exact.
- ``precision``: which autocast precision this machine grants (bf16 on CPUs only where native).
- ``accelerator``: the Accelerator and the run directory a run starts with.
- ``rundir``: whether a run may start in its ``output_dir`` (``train.resume: auto``, ``--overwrite``)
  and the clean-up of a failed start.
- ``images``: pictures a run draws, as TensorBoard images.
- ``config``: :class:`TrainConfig`, the ``train`` section of every stage.
"""

from mosmos.engine.accelerator import start_run
from mosmos.engine.config import TrainConfig
from mosmos.engine.loop import Engine
from mosmos.engine.task import Task

__all__ = ["Engine", "Task", "TrainConfig", "start_run"]
