"""Learning curves: engine snapshots (``train.snapshot_steps``) and early ends (``train.stop_after_steps``),
the benchmark's curve points, ``curves.csv`` and its plots.

The issue's check: a learning-curve point equals a separate run stopped at that step (same weights bit
for bit, same test Dice), and taking snapshots changes nothing in the run that takes them.
"""

from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mosmos.benchmark import hashing as hashing_module
from mosmos.benchmark.config import BenchmarkConfig
from mosmos.benchmark.hashing import NEUTRAL_KEYS, config_hash
from mosmos.benchmark.plan import make_plan
from mosmos.benchmark.plots import curve_intervals, dodged_positions, plot_dice_vs_steps
from mosmos.benchmark.report import CURVE_COLUMNS, curve_rows
from mosmos.benchmark.steps import curve_steps, step_cap
from mosmos.cli import main as cli
from mosmos.config import load_config
from mosmos.engine import Engine, TrainConfig
from mosmos.engine.checkpoints import list_checkpoints, list_snapshots
from mosmos.engine.schedule import cosine_with_warmup
from mosmos.errors import ConfigError
from tests.conftest import REPO
from tests.test_engine import Killed, ToyTask
from tests.test_finetune_e2e import tiny_finetune_overrides


# ------------------------------------------------------------------------------------- the engine
def _toy(tmp, kill_at=None, **overrides):
    cfg = TrainConfig(
        epochs=6, batch_size=8, lr=5e-2, warmup_steps=2, checkpoint_every=5, log_every=5, deterministic=True
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    task = ToyTask(kill_at=kill_at)  # its model has dropout: a snapshot that drew from the RNG would show
    engine = Engine(task, cfg, tmp, seed=3)
    engine.fit()
    return task, engine


def _state(task):
    return {k: v.clone() for k, v in task.model.state_dict().items()}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_snapshots_change_nothing_and_match_a_run_stopped_at_their_step(tmp_path):
    plain, _ = _toy(tmp_path / "plain")
    snap, engine = _toy(tmp_path / "snap", snapshot_steps=[3, 20, 1000])  # 1000: never reached
    _assert_equal(_state(plain), _state(snap))  # bit for bit: the snapshots touched no RNG or state
    snapshots = list_snapshots(tmp_path / "snap")
    assert list(snapshots) == [3, 20] and engine.global_step == 48
    stopped, stop_engine = _toy(tmp_path / "stop20", stop_after_steps=20)
    assert stop_engine.global_step == 20 and stop_engine.total_steps == 48
    _assert_equal(load_file(str(snapshots[20] / "model.safetensors")), _state(stopped))
    # the schedule still spans the whole budget: its learning rate after step 20 is the full run's
    # (a schedule of 20 steps would have decayed to 0 there)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-2)
    full_schedule = cosine_with_warmup(opt, 2, 48)
    assert stop_engine.scheduler.get_last_lr()[0] == pytest.approx(5e-2 * full_schedule.lr_lambdas[0](20))
    assert stop_engine.scheduler.get_last_lr()[0] > 0.01
    # and the stopped run's last checkpoint and evaluation are at its step
    assert list_checkpoints(tmp_path / "stop20")[0].name == "step_00000020"
    assert json.loads((tmp_path / "stop20" / "metrics.json").read_text())["final"]["step"] == 20


def test_a_resumed_run_keeps_its_snapshots_and_writes_the_later_ones(tmp_path):
    full, _ = _toy(tmp_path / "full", snapshot_steps=[3, 12, 40])
    with pytest.raises(Killed):  # killed in step 22: the checkpoint of step 20 survives
        _toy(tmp_path / "cut", kill_at=22, snapshot_steps=[3, 12, 40])
    cut = tmp_path / "cut"
    assert list(list_snapshots(cut)) == [3, 12]
    before = {k: (p / "model.safetensors").stat().st_mtime_ns for k, p in list_snapshots(cut).items()}
    (cut / "snapshots" / ".tmp_step_40").mkdir()  # a save killed half-way: removed at the start
    resumed, _ = _toy(cut, resume="latest", snapshot_steps=[3, 12, 40])
    _assert_equal(_state(full), _state(resumed))
    after = list_snapshots(cut)
    assert list(after) == [3, 12, 40] and not (cut / "snapshots" / ".tmp_step_40").exists()
    assert {k: (after[k] / "model.safetensors").stat().st_mtime_ns for k in before} == before
    for step, path in list_snapshots(tmp_path / "full").items():
        _assert_equal(
            load_file(str(path / "model.safetensors")), load_file(str(after[step] / "model.safetensors"))
        )


def test_snapshot_and_stop_keys_are_checked():
    with pytest.raises(ConfigError, match=r"train\.stop_after_steps=0"):
        TrainConfig(stop_after_steps=0).validate()
    with pytest.raises(ConfigError, match=r"train\.snapshot_steps=\[4, 0\]"):
        TrainConfig(snapshot_steps=[4, 0]).validate()


# ------------------------------------------------------------------------------- stage 2, for real
def _finetune(data, run, **extra):
    # one dataset (KidneyB: 1 training, 1 validation case); 2 epochs x 2 steps, evaluated at the end
    # only, so a run stopped at step 3 evaluates (and keeps as its model) exactly its step-3 weights
    target = data / "nnUNet_raw" / "Dataset012_KidneyB"
    extra = {"data.datasets": f"[{target}]", "train.eval_every": 2, "eval.hd95": "false", **extra}
    config = str(REPO / "configs/finetune/demo.yaml")
    assert cli(["finetune", "--config", config, *tiny_finetune_overrides(data, run, **extra)]) == 0
    return run


def _checkpoint_weights(run):
    return load_file(str(list_checkpoints(run)[0] / "model.safetensors"))


def test_a_stage2_learning_curve_point_equals_a_run_stopped_at_that_step(tiny_synth, tmp_path):
    plain = _finetune(tiny_synth, tmp_path / "plain")
    snap = _finetune(tiny_synth, tmp_path / "snap", **{"train.snapshot_steps": "[1,3]"})
    _assert_equal(_checkpoint_weights(plain), _checkpoint_weights(snap))  # snapshots change nothing
    _assert_equal(load_file(str(plain / "model.safetensors")), load_file(str(snap / "model.safetensors")))
    snapshots = list_snapshots(snap)
    assert list(snapshots) == [1, 3]
    assert {p.name for p in snapshots[3].iterdir()} == {"model.safetensors", "model.json"}

    stopped = _finetune(tiny_synth, tmp_path / "stop3", **{"train.stop_after_steps": 3})
    assert list_checkpoints(stopped)[0].name == "step_00000003"
    at3 = load_file(str(snapshots[3] / "model.safetensors"))
    _assert_equal(at3, _checkpoint_weights(stopped))
    _assert_equal(at3, load_file(str(stopped / "model.safetensors")))  # its one evaluation kept them
    assert not torch.equal(at3[next(iter(at3))], _checkpoint_weights(snap)[next(iter(at3))])  # not the end

    test_set = tiny_synth / "nnUNet_raw" / "Dataset099_SynthTest"
    scores = {}
    for name, model_dir in (("snapshot", snapshots[3]), ("stopped", stopped)):
        out = tmp_path / f"eval_{name}"
        assert (
            cli(["evaluate", "--model", str(model_dir), "--data", str(test_set), "--output", str(out)]) == 0
        )
        with (out / "cases.csv").open() as fh:
            scores[name] = [(r["case"], r["organ"], r["dice"]) for r in csv.DictReader(fh)]
    assert scores["snapshot"] == scores["stopped"] and scores["snapshot"]


# --------------------------------------------------------------------------------- the benchmark
@pytest.fixture
def bench_dirs(tmp_path):
    for name in ("target", "test", "other"):
        (tmp_path / name).mkdir()
    return tmp_path


def _config(root, **overrides) -> BenchmarkConfig:
    base = {
        "output_dir": str(root / "bench"),
        "data.target": str(root / "target"),
        "data.test": str(root / "test"),
        "data.other_datasets": f"[{root / 'other'}]",
        "strategies": "[random]",
        "fractions": "[0.5, 1.0]",
        "seeds": "[0]",
        "finetune_config": str(REPO / "configs/finetune/demo.yaml"),
        # the demo config: 96 patches per epoch / batch 2 = 48 steps per epoch; 2 epochs: a cap of 96
        "finetune_overrides": "[train.epochs=2]",
    }
    base.update(overrides)
    return load_config(BenchmarkConfig, None, [f"{k}={v}" for k, v in base.items()])


def test_each_cell_snapshots_at_its_curve_points_of_the_step_cap(bench_dirs, caplog):
    plan = make_plan(_config(bench_dirs))
    for cell in plan.cells:
        assert step_cap(cell.config) == 96
        assert cell.curve == {12: 0.125, 24: 0.25, 48: 0.5}
        assert cell.config.train.snapshot_steps == [12, 24, 48]
    # train.max_steps sets the cap; shares landing on one step, or on the cap, count once or not at all
    capped = make_plan(
        _config(bench_dirs, finetune_overrides="[train.max_steps=30]", curve_points="[0.1, 0.5]")
    )
    assert capped.cells[0].curve == {3: 0.1, 15: 0.5}
    assert curve_steps(4, [0.125, 0.25, 0.5, 0.9]) == {1: 0.125, 2: 0.5}
    assert curve_steps(1, [0.5]) == {}
    # gradient accumulation: the engine's optimizer steps
    accum = _config(bench_dirs, finetune_overrides="[train.epochs=2, train.grad_accum=4]")
    assert step_cap(make_plan(accum).cells[0].config) == 2 * (48 // 4)
    # no cap known from the config (an epoch is the training cases): no curve, and a warning says why
    with caplog.at_level(logging.WARNING, logger="mosmos"):
        unknown = make_plan(
            _config(bench_dirs, finetune_overrides="[train.epochs=2, data.samples_per_epoch=null]")
        )
    assert all(c.curve == {} and c.config.train.snapshot_steps == [] for c in unknown.cells)
    assert "no learning curve for ['random']" in caplog.text
    # mutual learning (two stages of cohorts) has no single step count: no curve
    mutual = make_plan(_config(bench_dirs, strategies="[]", partial_strategies="[masked, mutual]"))
    by_strategy = {c.strategy: c for c in mutual.cells}
    assert by_strategy["partial:masked"].curve and by_strategy["partial:mutual"].curve == {}
    with pytest.raises(ConfigError, match="curve_points"):
        _config(bench_dirs, curve_points="[0.5, 1.0]")


def test_curve_points_leave_the_cell_hashes_of_earlier_benchmarks_alone(bench_dirs, monkeypatch):
    with_curves = make_plan(_config(bench_dirs))
    without = make_plan(_config(bench_dirs, curve_points="[]"))
    assert [c.config_hash for c in with_curves.cells] == [c.config_hash for c in without.cells]
    # what a mosmos without these keys hashed: the same config, its tree lacking them
    cell = with_curves.cells[0]
    ignore = (*NEUTRAL_KEYS, "model.init")
    now = config_hash(cell.config, ignore)
    real = hashing_module.to_dict

    def older(cfg):
        tree = real(cfg)
        del tree["train"]["snapshot_steps"], tree["train"]["stop_after_steps"]
        return tree

    monkeypatch.setattr(hashing_module, "to_dict", older)
    assert config_hash(cell.config, ignore) == now
    monkeypatch.undo()
    # a run stopped early is another experiment
    cell.config.train.stop_after_steps = 5
    assert config_hash(cell.config, ignore) != now


def _curve_case_rows():
    """Two strategies x two seeds x three test cases x two organs, at snapshot steps 12 and 24 and the
    cells' own score (trained 96 steps)."""
    rng = np.random.default_rng(7)
    rows = []
    for strategy in ("random", "mosmos"):
        for seed in (0, 1):
            for step, share, weights in (
                (12, 0.125, "snapshot"),
                (24, 0.25, "snapshot"),
                (96, 1.0, "best_validation"),
            ):
                for case in ("c1", "c2", "c3"):
                    for organ in ("liver", "spleen"):
                        rows.append(
                            {
                                "axis": "initialisation",
                                "strategy": strategy,
                                "budget": "n4",
                                "fraction": 1.0,
                                "seed": seed,
                                "step": step,
                                "step_fraction": share,
                                "weights": weights,
                                "dataset": "Test",
                                "case": case,
                                "organ": organ,
                                "dice": float(rng.uniform(0.1, 0.9)),
                            }
                        )
    return rows


def test_the_curve_table_and_plot_match_numpy(tmp_path):
    rows = _curve_case_rows()
    table = curve_rows(rows)
    assert len(table) == 2 * 2 * 3 and set(table[0]) == set(CURVE_COLUMNS)

    def dice(strategy, seed, step):  # per case: mean over organs; then mean over cases
        values = np.array(
            [
                [
                    r["dice"]
                    for r in rows
                    if (r["strategy"], r["seed"], r["step"], r["case"]) == (strategy, seed, step, c)
                ]
                for c in ("c1", "c2", "c3")
            ]
        )
        return values.mean(axis=1).mean()

    for row in table:
        assert row["dice"] == pytest.approx(dice(row["strategy"], row["seed"], row["step"]))
        assert row["n_cases"] == 3
    final = [r for r in table if r["weights"] == "best_validation"]
    assert {(r["step"], r["step_fraction"]) for r in final} == {(96, 1.0)}
    points = curve_intervals(rows, "mosmos", "n4")
    assert [(x, w) for x, _, w in points] == [
        (12.0, "snapshot"),
        (24.0, "snapshot"),
        (96.0, "best_validation"),
    ]
    for (_x, ci, _), step in zip(points, (12, 24, 96), strict=True):
        assert ci.estimate == pytest.approx(np.mean([dice("mosmos", s, step) for s in (0, 1)]))
        assert ci.low <= ci.estimate <= ci.high and (ci.n_seeds, ci.n_cases) == (2, 3)
    plot_dice_vs_steps(rows, ["random", "mosmos"], ["n4", "f1"], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_strategies_are_dodged_apart_on_the_log_axis():
    x_of = {"n2": 2.0, "n4": 4.0, "n8": 8.0}
    pos = dodged_positions(x_of, ["random", "mosmos", "shuffled_tags"])
    for budget, x in x_of.items():
        xs = [pos[(s, budget)] for s in ("random", "mosmos", "shuffled_tags")]
        assert xs[0] < xs[1] < xs[2] and xs[1] == pytest.approx(x)  # spread around the budget
        assert math.log(xs[2] / xs[1]) == pytest.approx(math.log(xs[1] / xs[0]))  # evenly, in log space
    assert pos[("shuffled_tags", "n2")] < pos[("random", "n4")]  # groups never run into each other
    # budgets close together: the spread shrinks to keep the groups apart
    close = dodged_positions({"a": 10.0, "b": 11.0}, [str(i) for i in range(8)])
    assert close[("7", "a")] < close[("0", "b")]
    assert dodged_positions({"a": 3.0}, ["only"]) == {("only", "a"): 3.0}
