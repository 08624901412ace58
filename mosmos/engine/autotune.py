"""Speed settings decided on the machine at hand: the loader's worker count and the convolution
weights' memory format (``train.num_workers: auto``, ``train.channels_last: auto``).

Channels-last 3D convolutions are a large gain or a large loss depending on the CPU and the layer
shapes (measured on one 2-core AVX2 CPU: the stage 1 demo encoder at batch 16 ran 1.15x faster
channels-last, a small stage 2 U-Net at batch 2 eight times slower), so ``auto`` times a few
training steps of the real model on a real batch in both formats, as cuDNN's benchmark mode times
its kernels, and keeps the faster. The model's weights, buffers (norm statistics) and the random
state are restored afterwards, and the choice is written to ``autotune.json`` in the run directory
so that a resumed run takes the same one (its numbers then match an uninterrupted run's).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mosmos.channels_last import to_channels_last
from mosmos.io import write_json

logger = logging.getLogger("mosmos")

AUTOTUNE_FILE = "autotune.json"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpus_per_process() -> int:
    """CPUs this process may use, shared among the processes launched on this machine."""
    return max(1, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def resolve_num_workers(requested: int | str, device: torch.device) -> int:
    """``train.num_workers``: a number is kept; ``auto`` gives up to 8 beside a GPU, leaving one CPU
    to the training process, and on a CPU-only machine one worker from 3 CPUs per process up, none
    below.

    On a CPU the worker is one more busy process beside the training process's compute threads, and
    each OpenMP region waits for its slowest thread: on 2 cores a worker made the stage 1 encoder's
    forward pass 1.9x slower (py-spy), and both demo steps ran faster with the batch prepared in
    line (``benchmarks/loader_workers.py``, 2-core AMD EPYC: stage 1 1.12x and 1.27x, stage 2 1.06x
    and 1.50x; docs/results/stage1-speed.md).
    """
    if requested != "auto":
        return int(requested)
    cpus = cpus_per_process()
    if device.type == "cuda":
        return max(0, min(8, cpus - 1))
    return 1 if cpus >= 3 else 0


def _time_steps(
    model: torch.nn.Module, run_step: Callable[[torch.nn.Module], torch.Tensor], steps: int
) -> float:
    """Best seconds of forward + backward over ``steps`` timed steps, after one warm-up step."""
    best = float("inf")
    for i in range(steps + 1):
        start = time.perf_counter()
        run_step(model).backward()
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return best


def measure_layouts(
    model: torch.nn.Module, run_step: Callable[[torch.nn.Module], torch.Tensor], steps: int = 2
) -> dict[str, float]:
    """Seconds per forward + backward of ``run_step(model)`` (which returns the loss) with the
    default layout and with channels-last weights; ``model`` is left exactly as it was."""
    state = copy.deepcopy(model.state_dict())
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        default = _time_steps(model, run_step, steps)
        trial = to_channels_last(copy.deepcopy(model))
        channels_last = _time_steps(trial, run_step, steps)
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    return {"default": default, "channels_last": channels_last}


def choose_channels_last(
    requested: bool | str,
    model: torch.nn.Module,
    run_step: Callable[[torch.nn.Module], torch.Tensor],
    output_dir: Path,
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    is_main_process: bool = True,
) -> bool:
    """``train.channels_last``: ``True``/``False`` as given; ``auto``: the faster layout here, timed
    once per run directory (``autotune.json`` keeps the choice for resumes).

    Args:
        reduce_mean: averages a tensor over processes, so every process takes the same decision.
    """
    if requested != "auto":
        return bool(requested)
    if not any(p.ndim in (4, 5) for p in model.parameters()):
        return False  # no convolution weights: nothing to convert
    path = Path(output_dir) / AUTOTUNE_FILE
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return bool(json.loads(path.read_text())["channels_last"])
    seconds = measure_layouts(model, run_step)
    if reduce_mean is not None:
        both = reduce_mean(torch.tensor([seconds["default"], seconds["channels_last"]]))
        seconds = {"default": float(both[0]), "channels_last": float(both[1])}
    choice = seconds["channels_last"] < seconds["default"]
    logger.info(
        "train.channels_last=auto: %.3f s per step channels-last, %.3f s default: %s",
        seconds["channels_last"],
        seconds["default"],
        "channels-last" if choice else "default layout",
    )
    if is_main_process:
        record: dict[str, Any] = {"channels_last": choice, "seconds_per_step": seconds}
        write_json(path, record)
    return choice
