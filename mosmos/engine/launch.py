"""A stage as several single-threaded data-parallel processes on a CPU-only machine
(``train.cpu_processes``).

On a CPU, PyTorch runs each operator over OpenMP threads, which for stage 1's small 3D convolutions
on 2 cores reach only about 1.3x of one core; processes of one thread each on a share of the batch
reach more (stage 1 demo step, docs/results/stage1-speed.md: 0.346 s as two processes against
0.435 s as one of two threads with channels-last off on both sides; 1.09x with the default layout).
So where no GPU is present and a config's batch splits, ``mosmos pretrain`` / ``mosmos finetune``
can run as that many processes, each with ``batch_size / n`` samples, joined by a gloo process group
(what ``accelerate launch`` with configs/accelerate/cpu_2proc.yaml does by hand).

Why not ``accelerate launch`` / ``torch.distributed.run`` underneath: on Ctrl-C their agent
terminates the workers, while a run must finish its step and save a checkpoint. Here every rank is
in the terminal's process group, gets the Ctrl-C itself and agrees with the others on stopping
(``Engine._stop_requested``); this process only waits, and stops the others if one rank fails.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from mosmos.engine.autotune import usable_cpus
from mosmos.engine.config import TrainConfig
from mosmos.errors import ConfigError

logger = logging.getLogger("mosmos")

__all__ = ["MIN_BATCH_PER_PROCESS", "plan_cpu_processes", "run_ranks", "run_stage_maybe_split"]

#: The smallest batch ``auto`` gives a process: BatchNorm statistics over fewer samples are noise.
MIN_BATCH_PER_PROCESS = 4


def plan_cpu_processes(
    setting: int | str,
    batch_size: int,
    *,
    cpus: int | None = None,
    cuda: bool | None = None,
    environ: dict[str, str] | None = None,
) -> int:
    """How many processes a stage run splits into here (1: it runs as it is).

    One process where a GPU is present, where the command already runs under a launcher
    (``WORLD_SIZE`` set) or where the setting is 1. ``auto``: the most processes, at most one per
    usable CPU, that split ``batch_size`` evenly into at least :data:`MIN_BATCH_PER_PROCESS` each.
    A number: that many, which must divide ``batch_size``.
    """
    environ = os.environ if environ is None else environ
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda or "WORLD_SIZE" in environ or setting == 1:
        return 1
    if setting == "auto":
        cpus = usable_cpus() if cpus is None else cpus
        fits = [
            n for n in range(1, cpus + 1) if batch_size % n == 0 and batch_size // n >= MIN_BATCH_PER_PROCESS
        ]
        return max(fits, default=1)
    if batch_size % int(setting):
        raise ConfigError(
            f"train.cpu_processes={setting} does not divide train.batch_size={batch_size}: each process "
            "takes an equal share of the batch (set train.cpu_processes=auto or 1)"
        )
    return int(setting)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_environ(rank: int, world: int, port: int, threads: int) -> dict[str, str]:
    """A rank's environment: the process group's rendezvous (env://) and its thread count."""
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }


def run_ranks(module: str, argv: list[str], world: int, threads: int) -> int:
    """Run ``python -m module *argv`` as ``world`` ranks of a gloo process group; their exit code.

    A rank that fails stops the others (they would wait for it forever at the next collective).
    Ctrl-C reaches every rank from the terminal; this process ignores it and waits for them.
    """
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, "-m", module, *argv], env=_rank_environ(r, world, port, threads))
        for r in range(world)
    ]
    # a handler, not SIG_IGN, so the ranks (started above) keep the default and this one only waits
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    p.wait()
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGINT, previous)


def run_stage_maybe_split(
    module: str, config: str, overrides: list[str], train: TrainConfig, run_here: Callable[[], object]
) -> int:
    """Run a stage here (``run_here()``), or as :func:`plan_cpu_processes` processes of ``module``
    with the command line ``--config config *overrides`` and each process's share of the batch."""
    world = plan_cpu_processes(train.cpu_processes, train.batch_size)
    if world == 1:
        try:
            run_here()
        finally:
            # A rank that exits with its gloo group alive can abort in the group's destructor at
            # interpreter exit ("terminate called without an active exception", exit -6) after all
            # its work is done; accelerate's end_training destroys it, this covers the other exits.
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return 0
    threads = max(1, usable_cpus() // world)
    logger.info(
        "no GPU: training as %d data-parallel processes of %d thread(s), batch %d each (%d in all; "
        "train.cpu_processes=1 trains in this process)",
        world,
        threads,
        train.batch_size // world,
        train.batch_size,
    )
    argv = ["--config", str(config), *overrides, f"train.batch_size={train.batch_size // world}"]
    return run_ranks(module, argv, world, threads)
