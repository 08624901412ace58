"""The shared training engine: it learns, checkpoints atomically, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mosmos.engine import Engine, TrainConfig, precision
from mosmos.engine.checkpoints import COMPLETE_MARKER, list_checkpoints
from mosmos.engine.precision import cpu_has_native_bf16, resolve_mixed_precision
from mosmos.errors import ConfigError, MosmosError


class NoisyRegression(torch.utils.data.Dataset):
    """y = x @ w + noise, with per-(epoch, index) seeded 'augmentation' like the real datasets."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.epoch * 10_000 + i)
        return {"x": self.x[i] + 0.01 * torch.randn(4, generator=g), "y": self.y[i]}


class Killed(Exception):
    pass


class ToyTask:
    def __init__(self, nan_after: int | None = None, kill_at: int | None = None):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.1), nn.Linear(16, 1))
        self.train_dataset = NoisyRegression()
        self.collate_fn = None
        self.calls = 0
        self.nan_after = nan_after
        self.kill_at = kill_at

    def step(self, model, batch):
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed  # like SIGKILL: nothing after this point is saved
        loss = ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        if self.nan_after is not None and self.calls > self.nan_after:
            loss = loss * float("nan")
        return {"loss": loss, "mse": loss.detach()}

    def evaluate(self, model, epoch):
        ds = self.train_dataset
        return {"mse": float(((model(ds.x).squeeze(-1) - ds.y) ** 2).mean())}


def _run(tmp, kill_at=None, **overrides):
    cfg = TrainConfig(
        epochs=6, batch_size=8, lr=5e-2, warmup_steps=2, checkpoint_every=5, log_every=5, deterministic=True
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    task = ToyTask(kill_at=kill_at)
    history = Engine(task, cfg, tmp, seed=3).fit()
    return task, history


def test_engine_learns_and_writes_metrics(tmp_path):
    _, history = _run(tmp_path)
    assert history[-1]["mse"] < 0.2 * history[0]["mse"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["final"]["step"] == 48  # 64 cases / batch 8 = 8 steps x 6 epochs
    ckpts = list_checkpoints(tmp_path)
    assert len(ckpts) == 2 and all((c / COMPLETE_MARKER).is_file() for c in ckpts)
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


def _weights(task):
    return {k: v.clone() for k, v in task.model.state_dict().items()}


@pytest.mark.parametrize("stop_at", [13, 21])  # mid-epoch, and just after a checkpoint
def test_resume_is_exact(tmp_path, stop_at):
    full, _ = _run(tmp_path / "full")
    with pytest.raises(Killed):  # killed in step `stop_at`; the last checkpoint before it survives
        _run(tmp_path / "cut", kill_at=stop_at)
    resumed, _ = _run(tmp_path / "cut", resume="latest")
    # bit for bit: both runs use this process's kernels on the same batches in the same order, so any
    # difference means the resume replayed, skipped or reordered something
    for (k, a), b in zip(_weights(full).items(), _weights(resumed).values(), strict=True):
        assert torch.equal(a, b), k


def test_corrupt_checkpoint_falls_back(tmp_path, caplog):
    _run(tmp_path, max_steps=10, keep_checkpoints=3)
    newest = list_checkpoints(tmp_path)[0]
    for f in newest.glob("*.safetensors"):
        f.write_bytes(b"garbage")
    engine = Engine(ToyTask(), TrainConfig(batch_size=8, resume="latest"), tmp_path, seed=3)
    engine._prepare()
    assert engine.try_resume()
    assert engine.global_step == 5
    # set aside, so pruning never deletes the good checkpoints in favour of a corrupt newer one
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005"]
    assert (tmp_path / "checkpoints" / f"unusable_{newest.name}").is_dir()


def test_when_no_checkpoint_loads_the_run_stops_instead_of_starting_over(tmp_path):
    _run(tmp_path, max_steps=5)
    for f in list_checkpoints(tmp_path)[0].glob("*.safetensors"):
        f.write_bytes(b"garbage")
    engine = Engine(ToyTask(), TrainConfig(batch_size=8, resume="latest"), tmp_path, seed=3)
    engine._prepare()
    with pytest.raises(
        MosmosError, match=r"no usable checkpoint.*step_00000005.*rerun to start from scratch"
    ):
        engine.try_resume()
    assert not list_checkpoints(tmp_path)  # set aside: a second call starts from scratch
    assert not engine.try_resume()


def test_a_half_written_save_is_removed_at_start(tmp_path):
    stale = tmp_path / "checkpoints" / ".tmp_step_00000099"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    _run(tmp_path, max_steps=3)
    assert not stale.exists()


def test_non_finite_losses_abort_with_checkpoint(tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=8, max_bad_steps=3, checkpoint_every=100)
    with pytest.raises(MosmosError, match="non-finite"):
        Engine(ToyTask(nan_after=4), cfg, tmp_path, seed=0).fit()
    assert list_checkpoints(tmp_path)[0].name == "step_00000004"


def test_config_ranges():
    with pytest.raises(ConfigError, match=r"train\.lr"):
        TrainConfig(lr=-1.0).validate()


def test_freeze_steps_keep_a_prefix_fixed_then_train_it_at_its_scaled_rate(tmp_path):
    """task.freeze_steps / task.lr_scale: the first layer stays bit-identical for 5 steps, then moves."""
    cfg = TrainConfig(epochs=1, max_steps=12, batch_size=8, lr=5e-2, warmup_steps=0, checkpoint_every=100)
    task = ToyTask()
    task.freeze_steps = {"0.": 5}
    task.lr_scale = {"0.": 0.5}
    before = task.model[0].weight.detach().clone()
    snapshots = {}
    step = task.step

    def spy(model, batch):
        snapshots[len(snapshots)] = model[0].weight.detach().clone()
        return step(model, batch)

    task.step = spy
    engine = Engine(task, cfg, tmp_path, seed=0)
    engine.fit()
    for i in range(6):  # before step i runs, i steps have been taken: 0..5 see the frozen weights
        assert torch.equal(snapshots[i], before), i
    assert not torch.equal(snapshots[6], before)
    lrs = {(g["lr_scale"], g["freeze_steps"]) for g in engine.optimizer.param_groups}
    assert (0.5, 5) in lrs and (1.0, 0) in lrs


def test_rewarm_ramps_a_group_up_again_after_its_freeze():
    """cosine_with_warmup(rewarm=R): a group frozen for F steps has rate 0 before F, then (k+1)/R of
    the schedule's rate at step F+k for k < R, then the schedule's rate; an unfrozen group is never
    ramped a second time. Checked against the closed form."""
    import math

    from mosmos.engine.schedule import cosine_with_warmup

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    opt = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "lr_scale": 0.5, "freeze_steps": 6},
            {"params": model[1].parameters()},
        ],
        lr=1.0,
    )
    warmup, total, rewarm, frozen = 3, 20, 4, 6
    sched = cosine_with_warmup(opt, warmup, total, rewarm)

    def base(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    for step in range(total):
        held, free = (g["lr"] for g in opt.param_groups)
        ramp = 0.0 if step < frozen else min(1.0, (step - frozen + 1) / rewarm)
        assert held == pytest.approx(0.5 * ramp * base(step), rel=1e-12, abs=1e-15), step
        assert free == pytest.approx(base(step), rel=1e-12), step
        opt.step()
        sched.step()
    # without rewarm the group joins at the schedule's rate at once
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "freeze_steps": 6}], lr=1.0)
    sched = cosine_with_warmup(opt, warmup, total)
    for _ in range(frozen):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(base(frozen), rel=1e-12)


class InfGradTask(ToyTask):
    """The loss stays finite but its gradient is NaN (d/dx sqrt(x) at 0, times 0) after ``bad_after``
    calls."""

    def __init__(self, bad_after: int, bad_until: int | None = None):
        super().__init__()
        self.bad_after, self.bad_until = bad_after, bad_until

    def step(self, model, batch):
        out = super().step(model, batch)
        if self.bad_after < self.calls <= (self.bad_until or 10**9):
            out["loss"] = out["loss"] + torch.sqrt(model[0].weight.abs().sum() * 0.0)
        return out


@pytest.mark.parametrize("clip", [1.0, None])
def test_non_finite_gradient_skips_the_step_and_keeps_the_weights(tmp_path, caplog, clip):
    cfg = TrainConfig(epochs=1, max_steps=6, batch_size=8, lr=5e-2, warmup_steps=0, clip_grad=clip)
    task = InfGradTask(bad_after=3, bad_until=5)  # calls 4 and 5 have NaN gradients
    seen = {}
    step = task.step

    def spy(model, batch):
        seen[task.calls + 1] = model[0].weight.detach().clone()  # weights before call N
        return step(model, batch)

    task.step = spy
    with caplog.at_level("WARNING", logger="mosmos"):
        Engine(task, cfg, tmp_path, seed=0).fit()
    assert not torch.equal(seen[3], seen[4])  # call 3 was a good step
    # weights before calls 5 and 6 equal those before call 4: both bad steps were skipped
    assert torch.equal(seen[4], seen[5]) and torch.equal(seen[5], seen[6])
    assert not torch.equal(seen[6], seen[7])  # training goes on
    assert torch.isfinite(task.model[0].weight).all()
    warnings = [r.getMessage() for r in caplog.records if "non-finite gradient" in r.getMessage()]
    assert len(warnings) == 2 and "at step 4" in warnings[0]
    assert json.loads((tmp_path / "metrics.json").read_text())["final"]["step"] == 6


def test_non_finite_gradients_in_a_row_abort_with_the_last_good_state(tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=8, max_bad_steps=3, checkpoint_every=100, lr=5e-2)
    task = InfGradTask(bad_after=4)
    with pytest.raises(MosmosError, match=r"(?s)3 consecutive non-finite.*train\.lr=0\.05.*step_00000004"):
        Engine(task, cfg, tmp_path, seed=0).fit()
    from safetensors.torch import load_file

    saved = load_file(list_checkpoints(tmp_path)[0] / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_checkpoints_hold_no_pickled_objects_but_rng_state(tmp_path):
    """accelerate unpickles registered objects with weights_only=False; the scheduler lives in JSON
    instead."""
    _run(tmp_path, max_steps=5)
    ckpt = list_checkpoints(tmp_path)[0]
    assert not list(ckpt.glob("custom_checkpoint_*"))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 5


@pytest.mark.parametrize(
    ("requested", "cuda", "cpu_bf16", "expected"),
    [
        ("bf16", True, False, "bf16"),
        ("fp16", True, False, "fp16"),
        ("no", True, True, "no"),
        ("bf16", False, True, "bf16"),  # AVX512-BF16 / AMX
        ("bf16", False, False, "no"),  # emulated bf16 would be slower than fp32
        ("fp16", False, True, "no"),
        ("no", False, True, "no"),
    ],
)
def test_mixed_precision_on_cpu_only_where_bf16_is_native(requested, cuda, cpu_bf16, expected):
    assert resolve_mixed_precision(requested, cuda=cuda, cpu_bf16=cpu_bf16) == expected


def _forward_dtypes(tmp, mixed_precision: str) -> set[torch.dtype]:
    """The dtypes the toy model's first layer computes in during one epoch at ``mixed_precision``
    (inside the model: Accelerate hands the outputs back in float32)."""
    seen = []
    task = ToyTask()
    task.model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    cfg = TrainConfig(epochs=1, batch_size=8, lr=5e-2, warmup_steps=2, mixed_precision=mixed_precision)
    Engine(task, cfg, tmp, seed=3).fit()
    assert seen
    return set(seen)


def test_a_cpu_without_native_bf16_trains_in_float32_and_says_so(tmp_path, monkeypatch, caplog):
    if torch.cuda.is_available():
        pytest.skip("a GPU runs bf16 whatever the CPU")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("INFO", logger="mosmos"):
        assert _forward_dtypes(tmp_path, "bf16") == {torch.float32}
    assert "no native bf16 on this CPU, training in float32" in caplog.text


def test_bf16_runs_the_forward_in_bf16_where_the_cpu_has_it_and_a_later_run_may_change_it(tmp_path):
    native = torch.cuda.is_available() or cpu_has_native_bf16()
    assert _forward_dtypes(tmp_path / "bf16", "bf16") == {torch.bfloat16 if native else torch.float32}
    # the next run in the same process may ask for another precision (Accelerate would refuse it)
    assert _forward_dtypes(tmp_path / "fp32", "no") == {torch.float32}


class ScriptedTask(ToyTask):
    """Evaluation scores from a script (higher is better): the best is at the second evaluation."""

    monitor = "score"

    def __init__(self, scores):
        super().__init__()
        self.scores = list(scores)

    def evaluate(self, model, epoch):
        return {"score": self.scores[epoch - 1]}


def test_early_stopping_stops_after_patience_evaluations_without_a_better_score(tmp_path):
    cfg = TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup_steps=0, checkpoint_every=100, log_every=5)
    cfg.early_stopping_patience = 2
    # a tie with the best (0.5 at epoch 3) is not an improvement; NaN never is
    history = Engine(ScriptedTask([0.2, 0.5, 0.5, float("nan"), 0.9, 1.0]), cfg, tmp_path / "a", seed=0).fit()
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["step"] == 4 * 8  # 64 cases / batch 8, four epochs; no extra final evaluation
    # a resumed run that had stopped early stays stopped (the decision is in the checkpoint)
    cfg.resume = "latest"
    again = Engine(ScriptedTask([0.0] * 6), cfg, tmp_path / "a", seed=0).fit()
    assert [h["epoch"] for h in again] == [1, 2, 3, 4]
    # patience null (default) or a task without a monitored metric: the whole budget
    cfg.resume, cfg.early_stopping_patience = None, None
    history = Engine(ScriptedTask([0.2, 0.5, 0.5, 0.1, 0.1, 0.1]), cfg, tmp_path / "b", seed=0).fit()
    assert history[-1]["step"] == 48
    cfg.early_stopping_patience = 1
    assert Engine(ToyTask(), cfg, tmp_path / "c", seed=0).fit()[-1]["step"] == 48


def test_an_fsdp_launch_without_cuda_is_reported_as_unsharded():
    """Accelerate does not shard on CPUs (an FSDP launch there trains DDP or alone): the user is told so,
    and nothing is said on CUDA or without an FSDP launch."""
    from mosmos.engine.accelerator import fsdp_without_cuda_warning

    fsdp = {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}
    message = fsdp_without_cuda_warning(fsdp, cuda=False)
    assert message and "does not shard" in message and "(DDP over gloo) on 2 processes" in message
    assert "in one process" in fsdp_without_cuda_warning({"ACCELERATE_USE_FSDP": "true"}, cuda=False)
    assert fsdp_without_cuda_warning(fsdp, cuda=True) is None
    assert fsdp_without_cuda_warning({"WORLD_SIZE": "2"}, cuda=False) is None
    assert fsdp_without_cuda_warning({"ACCELERATE_USE_FSDP": "false", "WORLD_SIZE": "2"}, cuda=False) is None
