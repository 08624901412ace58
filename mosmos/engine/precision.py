"""Which autocast precision a run gets on the machine it runs on.

``train.mixed_precision`` is a request: a GPU grants it; a CPU grants bf16 only where oneDNN runs
bf16 natively (AVX512-BF16 or AMX), since emulated bf16 is slower than float32, and never fp16
(slow on CPUs, and it needs loss scaling). The decision is made at run time, so one config serves
a laptop and a GPU server, and the log says when a request was not granted.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("mosmos")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 kernels natively here (AVX512-BF16 or AMX).

    Emulated bf16 is slower than float32, so only native bf16 is worth autocasting to on a CPU.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_mixed_precision(requested: str, cuda: bool | None = None, cpu_bf16: bool | None = None) -> str:
    """The autocast precision a run gets: ``requested`` on a GPU; on a CPU, bf16 only where it is native.

    fp16 autocast on CPUs is slow and needs loss scaling, so it falls back to full precision there;
    bf16 on a CPU with AVX512-BF16/AMX takes the demo encoder's training step to 0.8x the float32
    time (benchmarks/bench_train_step.py --compare bf16).

    Args:
        requested: ``train.mixed_precision`` ("no", "fp16" or "bf16").
        cuda: whether a GPU is used (default: whether CUDA is available).
        cpu_bf16: whether the CPU runs bf16 natively (default: :func:`cpu_has_native_bf16`).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda or requested == "no":
        return requested
    if requested == "bf16" and (cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16):
        return "bf16"
    return "no"


def run_precision(requested: str) -> str:
    """:func:`resolve_mixed_precision` here and now, logging when the request falls back to float32."""
    precision = resolve_mixed_precision(requested)
    if precision != requested:
        logger.info(
            "train.mixed_precision=%s: no GPU%s, training in float32",
            requested,
            " and no native bf16 on this CPU" if requested == "bf16" else "",
        )
    return precision
