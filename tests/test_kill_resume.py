"""Checkpoints survive SIGKILL: both stages, killed at random points and in the middle of a save, with
a corrupt newest checkpoint, resume with ``train.resume=latest`` and end bit for bit where an
uninterrupted run ends (CPU, ``train.deterministic=true``, one thread).

The uninterrupted reference of each stage is a real ``python -m mosmos.pretrain`` / ``python -m mosmos.finetune``
process, run once per module. The faulted runs are the same ``python -m`` entry points
(``runpy.run_module(stage, run_name="__main__")``), forked from a helper process that has already
imported torch, MONAI and the project: each run then costs its training time rather than ~6 s of
imports on a 2-core machine. The helper never computes anything itself, so forking it is safe, and
since the reference is a fresh interpreter (its own hash seed, its own imports), equality also shows
that nothing in a run depends on process state the fork would share.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mosmos.engine.checkpoints import list_checkpoints
from tests.conftest import REPO, tiny_pretrain_overrides
from tests.test_finetune_e2e import tiny_finetune_overrides

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGKILL") or not hasattr(os, "fork"), reason="needs SIGKILL and fork"
)

STAGES = ("pretrain", "finetune")
STEPS = 16  # 4 epochs x 4 optimizer steps, a checkpoint after every step (2 kept)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _overrides(stage: str, data: Path, run: Path) -> list[str]:
    extra = {"train.epochs": 4, "train.checkpoint_every": 1, "train.keep_checkpoints": 2}
    if stage == "pretrain":
        return tiny_pretrain_overrides(data, run, **extra)
    return tiny_finetune_overrides(data, run, **{**extra, "data.samples_per_epoch": 8})


def _argv(stage: str, data: Path, run: Path, *more: str) -> list[str]:
    config = REPO / "configs" / stage / "demo.yaml"
    return ["--config", str(config), *_overrides(stage, data, run), *more]


# The helper ("zygote"): imports once, then forks one child per request. A child runs
# `python -m STAGE ARGV` with its output in a log file. With "die_in_save": [N, WHERE] it first wraps
# the save path so that the process SIGKILLs itself in its N-th checkpoint save, WHERE being
# "after_model": accelerate has written model.safetensors into checkpoints/.tmp_step_N, not yet the
# optimizer, RNG state, trainer_state.json or COMPLETE marker; "before_rename": every file of the new
# checkpoint, COMPLETE marker included, is written, the engine is about to fsync and rename it.
ZYGOTE = r"""
import importlib, json, os, runpy, signal, sys, traceback

for name in ("torch", "monai", "transformers", "accelerate", "safetensors.torch", "tqdm.auto",
             "torch.utils.tensorboard", "mosmos.cli", "mosmos.engine.checkpoints", "mosmos.pretrain.train",
             "mosmos.pretrain.objective", "mosmos.pretrain.metrics", "mosmos.finetune.train", "mosmos.finetune.metrics"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # only slower: the child imports what it needs


def die_in_save(n, where):
    import accelerate
    import accelerate.checkpointing
    import mosmos.engine.checkpoints

    saves = []

    def die_here():
        if len(saves) == n:
            os.kill(os.getpid(), signal.SIGKILL)

    real_save_state = accelerate.Accelerator.save_state

    def save_state(self, *args, **kwargs):
        saves.append(args[0] if args else kwargs.get("output_dir"))
        return real_save_state(self, *args, **kwargs)

    accelerate.Accelerator.save_state = save_state
    if where == "after_model":
        real_save = accelerate.checkpointing.save  # writes one file: model, optimizer, ...

        def save(obj, f, *args, **kwargs):
            out = real_save(obj, f, *args, **kwargs)
            if os.path.basename(f) == "model.safetensors":
                die_here()
            return out

        accelerate.checkpointing.save = save
    else:
        real_fsync = mosmos.engine.checkpoints._fsync_tree

        def fsync_tree(path):
            die_here()
            real_fsync(path)

        mosmos.engine.checkpoints._fsync_tree = fsync_tree


def child(req):
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdout.reconfigure(line_buffering=True)  # what a killed run printed is in its log
    import torch
    torch.set_num_threads(1)
    if req.get("die_in_save"):
        die_in_save(*req["die_in_save"])
    sys.argv = ["python -m mosmos." + req["stage"], *req["argv"]]
    try:
        runpy.run_module("mosmos." + req["stage"], run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


print("ZYGOTE ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(req)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        reply = {"pid": pid}
    else:  # "wait" (blocking) or "poll"
        pid, status = os.waitpid(req["pid"], 0 if req["op"] == "wait" else os.WNOHANG)
        reply = {"code": os.waitstatus_to_exitcode(status) if pid else None}
    print("ZYGOTE " + json.dumps(reply), flush=True)
"""


class Zygote:
    def __init__(self, log: Path) -> None:
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", ZYGOTE],
                cwd=REPO,
                env=ENV,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.ready = False
        self.running: set[int] = set()  # children not yet reaped

    def _reply(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            assert line, "the fork helper died"
            if line.startswith("ZYGOTE "):
                return {} if line.strip() == "ZYGOTE ready" else json.loads(line[len("ZYGOTE ") :])

    def _ask(self, **req) -> dict:
        if not self.ready:
            self._reply()
            self.ready = True
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def spawn(
        self, stage: str, argv: list[str], log: Path, die_in_save: tuple[int, str] | None = None
    ) -> int:
        pid = self._ask(op="run", stage=stage, argv=argv, log=str(log), die_in_save=die_in_save)["pid"]
        self.running.add(pid)
        return pid

    def poll(self, pid: int) -> int | None:
        code = self._ask(op="poll", pid=pid)["code"]
        if code is not None:
            self.running.discard(pid)
        return code

    def wait(self, pid: int) -> int:
        self.running.discard(pid)
        return self._ask(op="wait", pid=pid)["code"]

    def close(self) -> None:
        for pid in list(self.running):  # left by a failed test
            os.kill(pid, signal.SIGKILL)
            self.wait(pid)
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Runs:
    """Both stages' uninterrupted references (started together, each awaited on first use), the fork
    helper, and one directory (so one preprocessing cache) for every run of the module."""

    def __init__(self, base: Path, data: Path) -> None:
        self.base, self.data = base, data
        self.zygote = Zygote(base / "zygote.log")
        self.refs: dict[str, tuple[Path, subprocess.Popen]] = {}
        for stage in STAGES:
            run = base / f"{stage}-reference"
            with open(base / f"{stage}-reference.log", "wb") as log:
                cmd = [sys.executable, "-m", f"mosmos.{stage}", *_argv(stage, data, run)]
                proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
            self.refs[stage] = (run, proc)
        self.n = 0

    def reference(self, stage: str) -> Path:
        run, proc = self.refs[stage]
        rc = proc.wait(timeout=300)
        assert rc == 0, (self.base / f"{stage}-reference.log").read_text()[-3000:]
        return run

    def spawn(
        self, stage: str, run: Path, *more: str, die_in_save: tuple[int, str] | None = None
    ) -> tuple[int, Path]:
        self.n += 1
        log = run.parent / f"{run.name}.{self.n}.log"
        log.touch()  # polled before the child opens it
        return self.zygote.spawn(stage, _argv(stage, self.data, run, *more), log, die_in_save), log

    def finish(
        self, stage: str, run: Path, *more: str, die_in_save: tuple[int, str] | None = None
    ) -> tuple[int, str]:
        pid, log = self.spawn(stage, run, *more, die_in_save=die_in_save)
        return self.zygote.wait(pid), log.read_text()


@pytest.fixture(scope="module")
def runs(tiny_synth, tmp_path_factory):
    r = Runs(tmp_path_factory.mktemp("kill_resume"), tiny_synth)
    yield r
    r.zygote.close()
    for _, proc in r.refs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _final_weights(stage: str, run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The last checkpoint's model and the run's output model (stage 1: encoder, stage 2: best model)."""
    last = list_checkpoints(run)[0]
    output = "encoder.safetensors" if stage == "pretrain" else "model.safetensors"
    return {last.name: load_file(last / "model.safetensors"), output: load_file(run / output)}


def assert_same_as_reference(stage: str, run: Path, ref: Path) -> None:
    got, want = _final_weights(stage, run), _final_weights(stage, ref)
    assert got.keys() == want.keys()  # the same last checkpoint (step_00000016)
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for k in want[name]:
            torch.testing.assert_close(got[name][k], want[name][k], rtol=0, atol=0, msg=f"{name}: {k}")
    history = [json.loads((r / "metrics.json").read_text())["history"] for r in (run, ref)]
    assert history[0] == history[1]
    assert not list((run / "checkpoints").glob(".tmp_*")), "a temporary checkpoint was left behind"


def _newest_step(run: Path) -> int:
    """The newest checkpoint's step (0: none), -1 when it cannot tell (a directory moved while listing)."""
    try:
        found = list_checkpoints(run)
    except FileNotFoundError:
        return -1
    return int(found[0].name.split("_")[1]) if found else 0


def _kill_at_random_point(runs: Runs, stage: str, run: Path, rng: random.Random, lo: int, hi: int, *more):
    """Start a run and SIGKILL it at a random moment: once it trains and has saved step ``target``
    (random in [lo, hi]; 0: as soon as it trains), a random time later, up to two optimizer steps as
    long as this run's steps have taken so far (up to 0.5 s before it has taken one). The moment lands
    in a step, a save or an evaluation; at least 4 steps before the end whatever the machine's speed.
    Returns a description of the kill point and the run's log."""
    target, fraction = rng.randint(min(lo, hi), hi), rng.random()
    pid, log = runs.spawn(stage, run, *more)
    seen: dict[int, float] = {}  # checkpoint step -> when it was first seen
    deadline = time.time() + 240
    while time.time() < deadline and runs.zygote.poll(pid) is None:
        if "train:" in log.read_text():  # tqdm's bar: training has started
            seen.setdefault(_newest_step(run), time.time())
            if max(seen) >= target:
                break
        time.sleep(0.005)
    steps = sorted((s, t) for s, t in seen.items() if s > 0)
    step_time = (steps[-1][1] - steps[0][1]) / (steps[-1][0] - steps[0][0]) if len(steps) > 1 else 0.25
    delay = fraction * 2 * step_time
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    code = runs.zygote.wait(pid)
    text = log.read_text()
    assert code == -signal.SIGKILL, f"the run ended (exit {code}) before it was killed:\n{text[-3000:]}"
    tmp = [p.name for p in (run / "checkpoints").glob(".tmp_*")]
    point = f"step {target} + {delay:.2f} s: newest checkpoint step {_newest_step(run)}, partial {tmp}"
    print(f"{stage}: killed at {point}")
    return point, text


def _resumed_from(log: str) -> str | None:
    line = next((s for s in log.splitlines() if s.startswith("resumed from ")), None)
    return line.split()[2] if line else None


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("seed", [0, 1])
def test_killed_twice_at_random_points_resumes_to_identical_weights(runs, stage, seed):
    """SIGKILL at a random point, resume=latest, SIGKILL again at a later random point, resume to the end."""
    rng = random.Random(f"{stage}-{seed}")
    run = runs.base / f"{stage}-random{seed}"
    point1, _ = _kill_at_random_point(runs, stage, run, rng, 0, STEPS // 2)
    first = _newest_step(run)
    point2, log = _kill_at_random_point(runs, stage, run, rng, first + 1, STEPS - 5, "train.resume=latest")
    # a kill before the first checkpoint leaves nothing to resume: the next run starts from scratch
    expected = None if first == 0 else str(run / "checkpoints" / f"step_{first:08d}")
    assert _resumed_from(log) == expected, (point1, log[-2000:])
    second = _newest_step(run)
    assert second > 0, point2
    rc, log = runs.finish(stage, run, "train.resume=latest")
    assert rc == 0, log[-3000:]
    assert _resumed_from(log) == str(run / "checkpoints" / f"step_{second:08d}"), (point1, point2)
    assert_same_as_reference(stage, run, runs.reference(stage))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("save", "where"), [(1, "before_rename"), (2, "after_model"), (2, "before_rename")])
def test_killed_during_a_save_resumes_from_the_previous_checkpoint(runs, stage, save, where):
    """The process SIGKILLs itself inside its 1st / 2nd checkpoint save, part way through writing
    .tmp_step_N or with it complete but not renamed: resume=latest never reads the leftover, resumes
    from step N-1 (from scratch for N=1), overwrites the leftover when it saves step N again, and ends
    equal to the uninterrupted run."""
    run = runs.base / f"{stage}-save{save}-{where}"
    rc, log = runs.finish(stage, run, die_in_save=(save, where))
    assert rc == -signal.SIGKILL, log[-3000:]
    ckpts = run / "checkpoints"
    partial = ckpts / f".tmp_step_{save:08d}"
    assert (partial / "model.safetensors").is_file()
    assert (partial / "COMPLETE").is_file() == (where == "before_rename")
    assert (partial / "optimizer.bin").is_file() == (where == "before_rename")
    assert not (ckpts / f"step_{save:08d}").exists()
    assert [p.name for p in list_checkpoints(run)] == [f"step_{s:08d}" for s in range(save - 1, 0, -1)]

    rc, log = runs.finish(stage, run, "train.resume=latest")
    assert rc == 0, log[-3000:]
    assert _resumed_from(log) == (str(ckpts / f"step_{save - 1:08d}") if save > 1 else None), log[-2000:]
    assert_same_as_reference(stage, run, runs.reference(stage))  # no .tmp_* left either


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(runs, stage, damage):
    """Kill a run in its 6th save (step_4 and step_5 kept), damage step_5's model.safetensors (cut in
    half, or its last 4 KiB of tensor data overwritten: the same size, still a valid safetensors file):
    resume warns about step_5, continues from step_4 and still ends equal to the uninterrupted run."""
    run = runs.base / f"{stage}-{damage}"
    rc, log = runs.finish(stage, run, die_in_save=(6, "after_model"))
    assert rc == -signal.SIGKILL, log[-3000:]
    newest, previous = list_checkpoints(run)
    assert (newest.name, previous.name) == ("step_00000005", "step_00000004")
    weights = newest / "model.safetensors"
    blob = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(blob[: len(blob) // 2])
    else:
        weights.write_bytes(blob[:-4096] + random.Random(0).randbytes(4096))
        assert load_file(weights).keys() == load_file(previous / "model.safetensors").keys()

    rc, log = runs.finish(stage, run, "train.resume=latest")
    assert rc == 0, log[-3000:]
    warnings = [s for s in log.splitlines() if s.startswith("WARNING") and str(newest) in s]
    assert warnings and "falling back to the previous one" in warnings[0], log[-3000:]
    assert _resumed_from(log) == str(previous), log[-2000:]
    assert_same_as_reference(stage, run, runs.reference(stage))
