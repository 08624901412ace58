"""The machine's attainable peak for this workload: a large matmul and a large 3D convolution.

A training step of our networks is mostly 3D convolutions; what one such convolution reaches on
this machine (forward and backward, the better of the default and the channels-last-3d layout) is
the peak a step's achieved GFLOP/s is compared to (``benchmarks/stage_step.py`` via
:func:`count_flops`). The matmul is the machine's dense-arithmetic reference. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is 2 FLOPs), never by hand. bf16 is
measured only where it runs natively (a GPU; a CPU with AVX512-BF16 / AMX), as ratios to float32.

    python benchmarks/roofline.py [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, format_rows, row, sync

from mosmos.engine.precision import cpu_has_native_bf16

#: the row whose value is the conv3d peak (float32, best layout) that training steps are compared to
PEAK_ROW = "roofline/conv3d_fp32"
#: each timed call repeats the operation until it lasts about this long (timer resolution, GPU launches)
MIN_CALL_S = 0.05
#: quick -> (matmul n, conv3d (batch, channels, edge), timed rounds)
SIZES = {True: (1024, (1, 64, 32), 2), False: (2048, (2, 64, 48), 3)}


def count_flops(step_fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``step_fn`` (run once, under ``FlopCounterMode``).

    For a training step, ``step_fn`` runs forward and backward; convolutions and matmuls count,
    elementwise work (norms, activations, the optimizer) does not.

    Example::

        model = nn.Conv3d(8, 8, 3, padding=1)
        x = torch.randn(1, 8, 16, 16, 16, requires_grad=True)
        count_flops(lambda: model(x).sum().backward())  # 3 x forward: grad input + grad weight
    """
    with FlopCounterMode(display=False) as counter:
        step_fn()
    return int(counter.get_total_flops())


def gflops_per_s(flops: int, seconds: float) -> float:
    """Achieved GFLOP/s of ``flops`` done in ``seconds``."""
    return flops / seconds / 1e9


def native_bf16(device: str) -> bool:
    """Whether bf16 runs natively on ``device`` (any CUDA GPU here; a CPU with AVX512-BF16 / AMX)."""
    return torch.device(device).type == "cuda" or cpu_has_native_bf16()


def _repeated(fn: Callable[[], object], device: str) -> tuple[Callable[[], None], int]:
    """``fn`` repeated enough times per call to last about :data:`MIN_CALL_S`, and that count."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    n = max(1, math.ceil(MIN_CALL_S / max(time.perf_counter() - start, 1e-6)))

    def call() -> None:
        for _ in range(n):
            fn()

    return call, n


def _matmul(n: int, dtype: torch.dtype, device: str) -> Callable[[], None]:
    """An ``n x n`` by ``n x n`` matmul (forward) into a preallocated output."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def _conv_step(
    batch: int, channels: int, size: int, dtype: torch.dtype, device: str, channels_last: bool
) -> Callable[[], None]:
    """Forward + backward of one 3x3x3 convolution (gradients for both its input and its weight,
    as for any layer but the first of a network)."""
    torch.manual_seed(0)
    conv = nn.Conv3d(channels, channels, 3, padding=1, bias=False).to(device=device, dtype=dtype)
    x = torch.randn(batch, channels, size, size, size, device=device, dtype=dtype)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    conv = conv.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt).requires_grad_(True)
    grad = torch.randn_like(conv(x)).contiguous(memory_format=fmt)

    def step() -> None:
        conv.weight.grad = x.grad = None
        conv(x).backward(grad)

    return step


def rates(
    n: int, conv: tuple[int, int, int], dtype: torch.dtype, device: str, repeats: int
) -> dict[str, float]:
    """GFLOP/s of the matmul (``n``) and of the convolution (``(batch, channels, edge)``) in each
    layout: ``{"matmul", "conv3d_default", "conv3d_channels_last"}``, all timed in alternation."""
    fns = {
        "matmul": _matmul(n, dtype, device),
        "conv3d_default": _conv_step(*conv, dtype, device, channels_last=False),
        "conv3d_channels_last": _conv_step(*conv, dtype, device, channels_last=True),
    }
    flops = {name: count_flops(fn) for name, fn in fns.items()}
    calls = {name: _repeated(fn, device) for name, fn in fns.items()}
    best = best_of({name: call for name, (call, _) in calls.items()}, repeats, device)
    return {name: gflops_per_s(flops[name] * calls[name][1], t) for name, t in best.items()}


def measure(quick: bool, device: str, stage: str) -> list[dict]:
    """Rows of the roofline (the same for every ``stage``)."""
    n, (batch, channels, size), repeats = SIZES[quick]
    conv_shape = f"batch {batch}, {channels}->{channels} channels, 3x3x3, {size}^3 voxels, padding 1"
    rows = []
    fp32: dict[str, float] = {}  # what bf16 is compared to
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if native_bf16(device) else [])
    for label, dtype in dtypes:
        measured = rates(n, (batch, channels, size), dtype, device, repeats)
        mm = measured["matmul"]
        conv = {"default": measured["conv3d_default"], "channels_last": measured["conv3d_channels_last"]}
        layout = max(conv, key=conv.get)
        if label == "fp32":
            fp32 = {"matmul": mm, "conv3d": conv[layout]}
            mm_base, conv_base, conv_note = None, (mm, "matmul fp32"), "share of the matmul's rate"
        else:
            mm_base, conv_base, conv_note = "matmul fp32", (fp32["conv3d"], "conv3d fp32"), "against fp32"
        rows.append(
            row(
                f"roofline/matmul_{label}",
                mm,
                "GFLOP/s",
                None if mm_base is None else fp32["matmul"],
                mm_base,
                note=f"{n}x{n} @ {n}x{n}, forward",
            )
        )
        rows.append(
            row(
                f"roofline/conv3d_{label}_channels_last",
                conv["channels_last"],
                "GFLOP/s",
                conv["default"],
                f"conv3d {label}, default layout",
                note=f"{conv_shape}; forward + backward (grad input and weight)",
            )
        )
        rows.append(
            row(
                f"roofline/conv3d_{label}",
                conv[layout],
                "GFLOP/s",
                *conv_base,
                note=f"the conv3d peak, the better layout ({layout}); {conv_note}",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(format_rows(measure(args.quick, args.device, "all")))


if __name__ == "__main__":
    main()
