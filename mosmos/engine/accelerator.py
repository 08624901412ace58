"""The ``accelerate.Accelerator`` a run trains under, and the run directory it starts with."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mosmos.config import dump_config
from mosmos.engine.config import TrainConfig
from mosmos.engine.precision import run_precision
from mosmos.engine.rundir import CONFIG_FILE, clear_run_dir, plan_run_dir
from mosmos.io import atomic_write_text, library_versions, write_json

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from accelerate import Accelerator


def fsdp_without_cuda_warning(environ: dict[str, str], cuda: bool) -> str | None:
    """What to tell a user who launched with an FSDP config on a machine without CUDA, else None.

    Accelerate shards with FSDP on CUDA devices only: without CUDA its state is ``NO`` (each process
    alone), and with the CPU group :func:`make_accelerator` asks for, ``MULTI_CPU`` (DDP over gloo).
    Training is then correct but unsharded, which a user must know (docs/performance.md).
    """
    if cuda or environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true", "yes"):
        return None
    world = int(environ.get("WORLD_SIZE", "1"))
    how = f"data-parallel (DDP over gloo) on {world} processes" if world > 1 else "in one process"
    return (
        "accelerate launch with an FSDP config on a machine without CUDA: Accelerate does not shard on "
        f"CPUs, so this run trains {how} with full model copies (docs/performance.md)"
    )


def make_accelerator(cfg: TrainConfig, output_dir: str | Path) -> Accelerator:
    """The Accelerator a run uses: precision as :func:`~mosmos.engine.precision.run_precision` grants,
    TensorBoard logs under ``output_dir/logs``, and a process group on CPUs when launched on several."""
    # accelerate is imported here, not at the top: configs import TrainConfig and need none of it
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    precision = run_precision(cfg.mixed_precision)
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # One process may train several runs (the benchmark's cells, a notebook). Accelerate keeps
        # the first run's precision for the whole process and refuses another with a ValueError;
        # start its per-run state afresh (the process group, in PartialState, is kept).
        AcceleratorState._reset_state()

    # Under `accelerate launch --multi_gpu` on a machine without CUDA, Accelerate only forms a
    # (gloo) process group when asked for the CPU explicitly; otherwise each process runs alone.
    distributed_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    warning = fsdp_without_cuda_warning(dict(os.environ), torch.cuda.is_available())
    if warning:
        logger.warning(warning)
    return Accelerator(
        cpu=distributed_cpu,
        gradient_accumulation_steps=cfg.grad_accum,
        # host-to-GPU copies of (pinned) batches that do not wait for the GPU
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        mixed_precision=precision,
        log_with=None if cfg.log_with == "none" else cfg.log_with,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")
        ),
    )


def start_run(cfg: Any, train: TrainConfig) -> Accelerator:
    """Check the run directory, seed, create the Accelerator and, on the main process, the run
    directory with the resolved config and library versions (what every stage writes before training).

    ``train.resume`` / ``train.overwrite`` decide whether the run may start in ``cfg.output_dir``
    (:func:`mosmos.engine.rundir.plan_run_dir`: every process looks before the main one writes).

    Args:
        cfg: a stage's whole config (``output_dir``, ``seed`` and what :func:`dump_config` writes).
        train: its ``train`` section.

    Raises:
        ConfigError: the directory holds a run this one may not continue or replace.
    """
    from accelerate.utils import set_seed

    output_dir = Path(cfg.output_dir)
    clear = plan_run_dir(cfg, train)
    set_seed(cfg.seed)
    accelerator = make_accelerator(train, output_dir)
    accelerator.wait_for_everyone()  # every process has looked at the directory before it changes
    if accelerator.is_main_process:
        if clear:
            removed = clear_run_dir(output_dir)
            accelerator.print(f"overwrite: removed the earlier run's {', '.join(removed)} from {output_dir}")
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / CONFIG_FILE, dump_config(cfg))
        write_json(output_dir / "versions.json", library_versions())
    accelerator.wait_for_everyone()
    return accelerator
