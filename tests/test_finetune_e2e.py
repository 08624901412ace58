"""Stage 2 end to end on the tiny generated datasets: train, evaluate, predict, resume."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from mosmos.cli import main as cli
from tests.conftest import REPO, tiny_pretrain_overrides

DATASETS = ("Dataset011_AbdomenA", "Dataset012_KidneyB", "Dataset013_VesselsC")


def tiny_finetune_overrides(data, run, **extra) -> list[str]:
    raw = data / "nnUNet_raw"
    base = {
        "output_dir": str(run),
        "data.datasets": "[" + ",".join(str(raw / d) for d in DATASETS) + "]",
        "data.cache_dir": str(run.parent / "cache"),
        "data.patch_size": "[32,32,16]",
        "data.spacing": "[10.0,10.0,14.0]",
        "data.val_fraction": "0.5",
        "data.samples_per_epoch": "4",
        "model.encoder_kwargs": "{channels: [8, 16, 16, 16], strides: [2, 2, 2, 2], num_res_units: 1}",
        "train.epochs": "2",
        "train.batch_size": "2",
        "train.warmup_steps": "1",
        "train.checkpoint_every": "2",
        "train.eval_every": "1",
        "train.deterministic": "true",
        # fixed, not auto: runs that must match bit for bit need the same layout, and a worker
        # process per epoch would cost more than these tiny runs' steps
        "train.channels_last": "false",
        "train.num_workers": "0",
        "eval.hd95": "true",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def tiny_run(tiny_synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("ft") / "run"
    rc = cli(
        [
            "finetune",
            "--config",
            str(REPO / "configs/finetune/demo.yaml"),
            *tiny_finetune_overrides(tiny_synth, run),
        ]
    )
    assert rc == 0
    return run


def test_a_run_writes_its_model_metrics_and_per_case_results(tiny_run):
    for name in (
        "config.yaml",
        "versions.json",
        "metrics.json",
        "model.safetensors",
        "model.json",
        "val_cases.csv",
    ):
        assert (tiny_run / name).is_file(), name
    spec = json.loads((tiny_run / "model.json").read_text())
    assert [t["name"] for t in spec["tasks"]] == list(DATASETS)
    assert spec["preprocess"]["spacing"] == [10.0, 10.0, 14.0]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert "mean_dice" in metrics["best"] and len(metrics["history"]) == 2
    header = (tiny_run / "val_cases.csv").read_text().splitlines()[0]
    assert header.startswith("dataset,case,organ,dice,hd95")


def test_evaluate_on_the_fully_labelled_test_set(tiny_run, tiny_synth, tmp_path):
    out = tmp_path / "eval"
    rc = cli(
        [
            "evaluate",
            "--model",
            str(tiny_run),
            "--data",
            str(tiny_synth / "nnUNet_raw/Dataset099_SynthTest"),
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    spec = json.loads((tiny_run / "model.json").read_text())
    assert set(metrics["organs"]) == set(spec["organs"])  # the test set labels every organ
    rows = (out / "cases.csv").read_text().splitlines()
    assert len(rows) == 1 + len(spec["organs"])  # one test case x every organ


def test_predict_writes_label_maps_in_the_inputs_geometry(tiny_run, tiny_synth, tmp_path):
    images = tiny_synth / "nnUNet_raw/Dataset099_SynthTest/imagesTr"
    out = tmp_path / "pred"
    assert (
        cli(
            [
                "predict",
                "--model",
                str(tiny_run),
                "--input",
                str(images),
                "--output",
                str(out),
                "--probabilities",
            ]
        )
        == 0
    )
    src = sorted(images.glob("*.nii.gz"))[0]
    pred = nib.load(out / src.name.replace("_0000", ""))
    ref = nib.load(src)
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    assert pred.get_data_dtype() == np.uint8
    labels = json.loads((out / "labels.json").read_text())
    assert labels["0"] == "background" and len(labels) == 1 + len(
        json.loads((tiny_run / "model.json").read_text())["organs"]
    )
    with np.load(out / src.name.replace("_0000.nii.gz", ".npz")) as saved:
        probs, organs = saved["probabilities"], list(saved["organs"])
    assert probs.dtype == np.float16 and probs.shape == (len(organs), *ref.shape)
    assert json.loads((out / "dataset.json").read_text())["labels"] == {
        "background": 0,
        **{o: i + 1 for i, o in enumerate(organs)},
    }


def test_predict_with_an_unknown_task_fails_before_any_work(tiny_run, tiny_synth, tmp_path, capsys):
    images = tiny_synth / "nnUNet_raw/Dataset099_SynthTest/imagesTr"
    rc = cli(
        [
            "predict",
            "--model",
            str(tiny_run),
            "--input",
            str(images),
            "--output",
            str(tmp_path / "p"),
            "--task",
            "Nope",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "Nope" in err and "Dataset011_AbdomenA" in err
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").glob("*.nii.gz"))


def test_stage1_encoder_initialises_stage2_with_attention_maps(tiny_synth, tmp_path):
    pre = tmp_path / "pre"
    assert (
        cli(
            [
                "pretrain",
                "--config",
                str(REPO / "configs/pretrain/demo.yaml"),
                *tiny_pretrain_overrides(tiny_synth, pre, **{"train.epochs": 1}),
            ]
        )
        == 0
    )
    run = tmp_path / "ft"
    rc = cli(
        [
            "finetune",
            "--config",
            str(REPO / "configs/finetune/demo.yaml"),
            *tiny_finetune_overrides(
                tiny_synth,
                run,
                **{
                    "model.init": pre,
                    "model.attention_maps": "true",
                    "model.encoder_kwargs": "null",  # from the stage 1 encoder.json
                    "train.epochs": 1,
                },
            ),
        ]
    )
    assert rc == 0
    spec = json.loads((run / "model.json").read_text())
    assert spec["attention_head"] is not None and spec["encoder_kwargs"]["channels"] == [8, 16, 16, 16]
