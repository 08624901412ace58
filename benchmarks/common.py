"""What the benchmark modules share: the result row, an alternating timer, generated data.

Every module composed by ``benchmarks/run.py`` exposes ``measure(quick, device, stage) -> list[dict]``
and returns rows made by :func:`row`. A row's figure is a ratio to a baseline measured in the same
run on the same work; ``goal`` is a condition on that ratio (``">= 1.0x"``, ``"<= 1.2x"``), or on
the value itself for a row without a baseline (``">= 0.99"``).
"""

from __future__ import annotations

import operator
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
ROW_KEYS = ("name", "value", "unit", "baseline", "baseline_name", "ratio", "goal", "met", "note")
_GOAL = re.compile(r"^\s*(>=|<=|>|<)\s*([0-9.eE+-]+)\s*(x?)\s*$")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def row(
    name: str,
    value: float,
    unit: str,
    baseline: float | None = None,
    baseline_name: str | None = None,
    *,
    inverse: bool = False,
    goal: str | None = None,
    note: str = "",
) -> dict:
    """One result row.

    Args:
        name: ``module/what``, e.g. ``"inference/predict_unet"``.
        value: the measurement, in ``unit``.
        unit: e.g. ``"s"``, ``"GFLOP/s"``, ``"MiB"``.
        baseline: the same quantity for the baseline, measured in the same run (None: no ratio).
        baseline_name: what the baseline is.
        inverse: the ratio is ``baseline / value`` (for times: a speed-up) instead of ``value / baseline``.
        goal: ``"<op> <number>x"`` on the ratio, or ``"<op> <number>"`` on the value when there is no
            baseline; ``op`` one of ``>= <= > <``.
        note: how it was measured; the ratio's direction is prepended.

    Raises:
        ValueError: a goal that does not parse, or one in ``x`` without a baseline.
    """
    ratio = None
    if baseline is not None:
        ratio = (baseline / value if inverse else value / baseline) if (value and baseline) else float("nan")
        direction = "ratio = baseline / value" if inverse else "ratio = value / baseline"
        note = f"{direction}; {note}" if note else direction
    met = None
    if goal is not None:
        m = _GOAL.match(goal)
        if m is None:
            raise ValueError(
                f"goal {goal!r} must look like '>= 1.0x' (on the ratio) or '>= 0.99' (on the value)"
            )
        on_ratio = m.group(3) == "x"
        if on_ratio and ratio is None:
            raise ValueError(f"goal {goal!r} is on the ratio, but row {name!r} has no baseline")
        subject = ratio if on_ratio else value
        met = bool(_OPS[m.group(1)](subject, float(m.group(2))))
    return {
        "name": name,
        "value": float(value),
        "unit": unit,
        "baseline": None if baseline is None else float(baseline),
        "baseline_name": baseline_name,
        "ratio": ratio,
        "goal": goal,
        "met": met,
        "note": note,
    }


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a wall-clock time includes it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_of(fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu") -> dict[str, float]:
    """The best wall time (s) of each function over ``repeats`` rounds, run in turn within each round.

    Each function runs once untimed first (kernel selection, caches). Alternating rather than
    timing one function's repeats and then the next makes a drift in machine load hit all alike;
    the minimum is the least disturbed run.
    """
    for fn in fns.values():
        fn()
    sync(device)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def synth(out: Path, pretrain_cases: int, seg_cases: int = 1, test_cases: int = 1, workers: int = 1) -> Path:
    """Generated phantoms (``mosmos synth``, seed 0) in ``out``, at the default 64 x 64 x 40 voxels."""
    from mosmos.synth import synthesize

    synthesize(
        out,
        seed=0,
        pretrain_cases=pretrain_cases,
        seg_cases=seg_cases,
        test_cases=test_cases,
        progress=False,
        workers=workers,
    )
    return out


def timed_command(argv: list[str], cwd: Path, env: dict[str, str], what: str) -> float:
    """Wall seconds of one command run to its end; its output's tail as the error when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of ``rows`` (for a module run on its own)."""
    lines = [f"{'name':44s} {'value':>12s} {'unit':9s} {'baseline':>10s} {'ratio':>7s} {'goal':>8s}  met"]
    for r in rows:
        base = "-" if r["baseline"] is None else f"{r['baseline']:.4g}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(
            f"{r['name']:44s} {r['value']:12.4g} {r['unit']:9s} {base:>10s} {ratio:>7s} "
            f"{r['goal'] or '-':>8s}  {met}"
        )
    return "\n".join(lines)
