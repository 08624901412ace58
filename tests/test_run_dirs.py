"""Run directories: ``train.resume: auto`` continues or refuses, ``--overwrite`` replaces, a failed start
leaves nothing behind, and stage 2 draws overlays of its validation predictions."""

from __future__ import annotations

import io
import json
import shutil
import signal

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from mosmos.cli import main as cli
from mosmos.config import dump_config, load_config
from mosmos.engine.rundir import clear_run_dir, config_differences, plan_run_dir, removed_if_start_fails
from mosmos.errors import ConfigError, MosmosError
from mosmos.finetune.config import FinetuneConfig
from tests.conftest import REPO, tiny_pretrain_overrides
from tests.test_finetune_e2e import tiny_finetune_overrides

DEMO = REPO / "configs" / "finetune" / "demo.yaml"
# two steps (one per epoch), an evaluation after each, two of the three validation cases drawn
SHORT = {
    "train.epochs": 2,
    "data.samples_per_epoch": 2,
    "train.checkpoint_every": 1,
    "train.keep_checkpoints": 5,
    "eval.hd95": "false",
    "eval.overlays": 2,
}


def _args(data, run, **extra) -> list[str]:
    return ["finetune", "--config", str(DEMO), *tiny_finetune_overrides(data, run, **{**SHORT, **extra})]


def _final_weights(run) -> dict:
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    return load_file(newest / "model.safetensors")


@pytest.fixture(scope="module")
def full_run(tiny_synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("rundirs") / "full"
    assert cli(_args(tiny_synth, run)) == 0
    return run


@pytest.fixture
def finished_copy(full_run, tmp_path):
    """A copy of the finished run (its data cache beside it, as the copied config names it)."""
    run = tmp_path / "full"
    shutil.copytree(full_run, run)
    return run


# ------------------------------------------------------------------- auto resume, refusals, overwrite
def test_auto_resume_after_an_interrupt_ends_where_an_uninterrupted_run_ends(
    full_run, tiny_synth, tmp_path, monkeypatch, capsys
):
    from mosmos.finetune.train import FinetuneTask

    step = FinetuneTask.step
    calls = {"n": 0}

    def interrupted_step(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 1:  # Ctrl-C during the first step: the engine saves step 1 and stops
            signal.raise_signal(signal.SIGINT)
        return step(self, model, batch)

    run = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(FinetuneTask, "step", interrupted_step)
        assert cli(_args(tiny_synth, run)) == 0
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_00000001"]
    assert not (run / "metrics.json").exists()  # stopped inside the first epoch, before any evaluation
    capsys.readouterr()
    # the same command again (train.resume: auto, the default) continues it
    assert cli(_args(tiny_synth, run)) == 0
    assert f"resumed from {run / 'checkpoints' / 'step_00000001'}" in capsys.readouterr().out
    for (name, a), b in zip(_final_weights(full_run).items(), _final_weights(run).values(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), name
    history = [json.loads((r / "metrics.json").read_text())["history"] for r in (full_run, run)]
    assert [h["mean_dice"] for h in history[0]] == [h["mean_dice"] for h in history[1]]


def test_a_finished_run_is_refused_and_overwrite_replaces_it(finished_copy, tiny_synth, capsys):
    run = finished_copy
    weights = (run / "model.safetensors").read_bytes()
    assert cli(_args(tiny_synth, run)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run) in err and "finished run" in err and "--overwrite" in err
    assert (run / "model.safetensors").read_bytes() == weights
    # a folder that also holds a user's file is never cleared
    (run / "notes.txt").write_text("mine")
    assert cli([*_args(tiny_synth, run), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "nothing was deleted" in err
    assert (run / "notes.txt").is_file() and (run / "model.safetensors").read_bytes() == weights
    (run / "notes.txt").unlink()
    # mosmos' own files (an evaluation's default output among them) go, and the run starts afresh
    (run / "eval_Dataset099_Old").mkdir()
    (run / "eval_Dataset099_Old" / "metrics.json").write_text("{}")
    (run / "checkpoints" / "step_00000009").mkdir()  # a later step of the old run, not to be mixed in
    assert cli([*_args(tiny_synth, run), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "overwrite: removed" in out and "resumed from" not in out
    assert not (run / "eval_Dataset099_Old").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    assert "best" in json.loads((run / "metrics.json").read_text())


def test_a_changed_config_is_refused_naming_the_directory_and_keys(finished_copy, tiny_synth, capsys):
    run = finished_copy
    (run / "metrics.json").unlink()  # no longer finished: an interrupted run with checkpoints
    saved = (run / "config.yaml").read_text()
    # eval.overlays and train.num_workers do not change results: they are not named
    args = _args(tiny_synth, run, **{"train.lr": 0.002, "eval.overlays": 1, "train.num_workers": 1})
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run) in err, err
    assert "train.lr (0.003 -> 0.002)" in err
    assert "eval.overlays" not in err and "num_workers" not in err
    assert "new output_dir" in err and "--overwrite" in err
    assert (run / "config.yaml").read_text() == saved


# ------------------------------------------------------------------------- the decision, unit by unit
def _cfg(run, *overrides):
    return load_config(FinetuneConfig, None, ["data.datasets=[x]", f"output_dir={run}", *overrides])


def _fake_run(run, cfg, finished=False, step_dir="checkpoints"):
    (run / step_dir / "step_00000004").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    if finished:
        (run / "metrics.json").write_text(json.dumps({"history": [], "best": {}}))


def test_auto_starts_afresh_in_a_new_or_empty_folder_and_continues_the_same_config(tmp_path):
    run = tmp_path / "run"
    assert plan_run_dir(_cfg(run), _cfg(run).train) is False  # missing
    run.mkdir()
    assert plan_run_dir(_cfg(run), _cfg(run).train) is False  # empty
    _fake_run(run, _cfg(run))
    # result-neutral keys may differ; a key the saved config lacks counts as its default
    cfg = _cfg(run, "data.cache_dir=/elsewhere", "train.log_every=3", "eval.overlays=0")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["eval"]["overlays"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_differences(cfg, run) == {}
    assert plan_run_dir(cfg, cfg.train) is False


def test_the_saved_config_of_stage_folders_counts_and_null_refuses_checkpoints(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, _cfg(run), step_dir="stage_a/checkpoints")  # mutual learning's stage folders
    with pytest.raises(ConfigError, match=r"differs in train\.epochs \(10 -> 3\)"):
        plan_run_dir(_cfg(run, "train.epochs=3"), _cfg(run, "train.epochs=3").train)
    null = _cfg(run, "train.resume=null")
    with pytest.raises(ConfigError, match=r"train\.resume=null starts afresh, but .* holds checkpoints"):
        plan_run_dir(null, null.train)
    # latest continues unchecked (the benchmark and the demo rely on it), and cannot overwrite
    latest = _cfg(run, "train.resume=latest", "train.epochs=3")
    assert plan_run_dir(latest, latest.train) is False
    both = _cfg(run, "train.resume=latest", "train.overwrite=true")
    with pytest.raises(ConfigError, match=r"cannot be combined with train\.resume='latest'"):
        plan_run_dir(both, both.train)


def test_overwrite_removes_only_what_mosmos_wrote(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, _cfg(run), finished=True)
    with pytest.raises(ConfigError, match="holds a finished run"):
        plan_run_dir(_cfg(run), _cfg(run).train)
    over = _cfg(run, "train.overwrite=true")
    assert plan_run_dir(over, over.train) is True
    (run / ".model.safetensors.abc.tmp").write_text("")  # a killed atomic write
    assert set(clear_run_dir(run)) == {
        "checkpoints",
        "config.yaml",
        "metrics.json",
        ".model.safetensors.abc.tmp",
    }
    assert list(run.iterdir()) == []
    # nothing to replace: overwrite leaves a folder of someone else's files alone and writes beside them
    (run / "data.csv").write_text("a")
    assert plan_run_dir(over, over.train) is False


# ----------------------------------------------------------------------------------- failed starts
def test_a_failed_start_leaves_no_run_directory(tiny_synth, tmp_path):
    from mosmos.finetune.train import run as finetune

    run = tmp_path / "new" / "run"
    cfg = load_config(
        FinetuneConfig,
        DEMO,
        tiny_finetune_overrides(tiny_synth, run, **{"data.datasets": f"[{tmp_path / 'no_such_dataset'}]"}),
    )
    with pytest.raises(MosmosError, match="no_such_dataset"):
        finetune(cfg)
    assert not run.exists()
    # a folder that was there keeps exactly what it held
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(MosmosError, match="no_such_dataset"):
        finetune(cfg)
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


def test_a_failed_stage1_start_leaves_no_run_directory(tiny_synth, tmp_path):
    from mosmos.pretrain.config import PretrainConfig
    from mosmos.pretrain.train import run as pretrain

    run = tmp_path / "run"
    overrides = tiny_pretrain_overrides(tiny_synth, run, **{"data.table": tmp_path / "missing.csv"})
    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "demo.yaml", overrides)
    with pytest.raises(MosmosError, match=r"missing\.csv"):
        pretrain(cfg)
    assert not run.exists()


def test_progress_is_never_removed(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError), removed_if_start_fails(run):
        (run / "checkpoints" / "step_00000001").mkdir(parents=True)
        raise RuntimeError("after the first checkpoint")
    assert (run / "checkpoints" / "step_00000001").is_dir()


# ---------------------------------------------------------------------------------------- overlays
def test_overlays_of_the_best_model_are_written_and_logged(full_run):
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mosmos.finetune.overlays import organ_colour

    pngs = sorted((full_run / "overlays").glob("*.png"))
    assert len(pngs) == 2  # eval.overlays=2 of the three validation cases, one dataset each
    assert {p.name.split("_")[0] for p in pngs} == {"Dataset011", "Dataset012"}
    organs = json.loads((full_run / "model.json").read_text())["organs"]
    for png in pngs:
        rgb = np.round(imread(png)[..., :3] * 255).astype(int)
        # the ground-truth outlines are drawn in their organs' exact colours
        outlined = [
            o
            for i, o in enumerate(organs, start=1)
            if (np.abs(rgb - np.round(np.array(organ_colour(i)) * 255)).sum(-1) == 0).sum() >= 10
        ]
        assert outlined, png
    tags = set()
    for events in (full_run / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        tags.update(acc.Tags()["images"])
    assert {f"overlays/{p.stem}" for p in pngs} <= tags


def test_an_overlay_outlines_the_truth_in_the_organs_colour():
    from matplotlib.image import imread

    from mosmos.finetune.overlays import best_slice, organ_colour, overlay_png

    image = np.full((40, 40, 6), 40.0, np.float32)
    label = np.zeros((40, 40, 6), np.uint8)
    label[10:30, 12:28, 4] = 2
    label[5:8, 5:8, 1] = 1
    empty = np.zeros_like(label)
    assert best_slice(label, organs=2) == 4

    def exact(png, organ):
        rgb = np.round(imread(io.BytesIO(png))[..., :3] * 255).astype(int)
        return int((np.abs(rgb - np.round(np.array(organ_colour(organ)) * 255)).sum(-1) == 0).sum())

    outlined = overlay_png(image, label, empty, ["liver", "spleen"], "case")
    assert exact(outlined, 2) > 100
    # the prediction alone is filled half-transparent: the exact colour is the outline's only
    predicted = overlay_png(image, empty, label, ["liver", "spleen"], "case")
    assert exact(predicted, 2) == 0
