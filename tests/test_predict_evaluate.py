"""``mosmos predict`` (names, options, outputs), ``mosmos evaluate --predictions`` and label mapping,
and the stage 2 export, on one tiny stage 2 run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import mosmos
from mosmos.cli import main as cli
from mosmos.finetune.predict import case_names
from tests.conftest import REPO
from tests.test_finetune_e2e import tiny_finetune_overrides

TEST_SET = "nnUNet_raw/Dataset099_SynthTest"
NAMES = ("patient_0001.nii.gz", "a.b.nii", "scan-07.nii.gz")


@pytest.fixture(scope="module")
def run(tiny_synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pe") / "run"
    overrides = tiny_finetune_overrides(tiny_synth, out, **{"train.epochs": 1, "eval.hd95": "false"})
    assert cli(["finetune", "--config", str(REPO / "configs/finetune/demo.yaml"), *overrides]) == 0
    return out


@pytest.fixture
def inputs(tiny_synth, tmp_path) -> Path:
    """One test volume under ordinary names, one of them uncompressed."""
    src = sorted((tiny_synth / TEST_SET / "imagesTr").glob("*.nii.gz"))[0]
    folder = tmp_path / "in"
    folder.mkdir()
    for name in NAMES:
        nib.save(nib.load(src), folder / name)
    return folder


def test_the_channel_suffix_goes_only_when_every_input_has_it():
    nnunet = [Path("case_001_0000.nii.gz"), Path("case_002_0000.nii")]
    assert case_names(nnunet) == [("case_001", ".nii.gz"), ("case_002", ".nii")]
    mixed = [Path("case_001_0000.nii.gz"), Path("patient_0001.nii.gz")]
    assert case_names(mixed) == [("case_001_0000", ".nii.gz"), ("patient_0001", ".nii.gz")]
    assert case_names([Path(n) for n in NAMES]) == [
        ("patient_0001", ".nii.gz"),
        ("a.b", ".nii"),
        ("scan-07", ".nii.gz"),
    ]


def test_predict_keeps_every_input_name_and_writes_nnunet_labels(run, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["predict", "-m", str(run), "-i", str(inputs), "-o", str(out), "--probabilities"]) == 0
    spec = json.loads((run / "model.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*NAMES, "patient_0001.npz", "a.b.npz", "scan-07.npz", "dataset.json", "labels.json"]
    )
    for name in NAMES:
        pred, ref = nib.load(out / name), nib.load(inputs / name)
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
        assert pred.get_data_dtype() == np.uint8
    assert (out / "a.b.nii").read_bytes()[:4] != b"\x1f\x8b\x08\x00"  # .nii stays uncompressed
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, **{o: i + 1 for i, o in enumerate(spec["organs"])}}
    with np.load(out / "scan-07.npz") as saved:
        assert saved["probabilities"].dtype == np.float16 and list(saved["organs"]) == spec["organs"]
        probs = saved["probabilities"]
    assert probs.shape == (len(spec["organs"]), *nib.load(inputs / NAMES[0]).shape)
    full = np.asarray(nib.load(out / "scan-07.nii.gz").dataobj)

    # --continue: nothing is predicted again
    stamp = (out / "scan-07.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert (
        cli(["predict", "-m", str(run), "-i", str(inputs), "-o", str(out), "--probabilities", "--continue"])
        == 0
    )
    assert "3 of 3 case(s) already predicted" in capsys.readouterr().out
    assert (out / "scan-07.nii.gz").stat().st_mtime_ns == stamp

    # --organs: the same voxels for the organs kept, each under its own id, nothing else
    keep = [spec["organs"][0], spec["organs"][2]]
    sub = tmp_path / "sub"
    assert (
        cli(
            [
                "predict",
                "-m",
                str(run),
                "-i",
                str(inputs / "scan-07.nii.gz"),
                "-o",
                str(sub),
                "--organs",
                ",".join(keep),
            ]
        )
        == 0
    )
    part = np.asarray(nib.load(sub / "scan-07.nii.gz").dataobj)
    ids = [1, 3]
    np.testing.assert_array_equal(part, np.where(np.isin(full, ids), full, 0))
    assert json.loads((sub / "dataset.json").read_text())["labels"] == {
        "background": 0,
        keep[0]: 1,
        keep[1]: 3,
    }

    # mirroring TTA runs and changes the probabilities, not the shapes
    tta = tmp_path / "tta"
    assert (
        cli(["predict", "-m", str(run), "-i", str(inputs / "scan-07.nii.gz"), "-o", str(tta), "--tta"]) == 0
    )
    assert nib.load(tta / "scan-07.nii.gz").shape == nib.load(inputs / "scan-07.nii.gz").shape


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--overlap", "1.5"], "--overlap 1.5: must be in [0, 1)"),
        (["--sw-batch-size", "0"], "--sw-batch-size 0: must be at least 1"),
        (["--organs", "liver,nope"], "--organs: ['nope'] not among the model's organs"),
        (["--task", "Nope"], "task 'Nope' is not one of this model's tasks"),
        (["--device", "warp"], "--device 'warp' is not a device"),
        (
            ["--device", "cpu", "--precision", "float16"],
            "--precision float16: half precision needs a CUDA device",
        ),
        pytest.param(
            ["--device", "cuda"],
            "has no CUDA; use --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA build with a GPU"),
        ),
    ],
)
def test_a_wrong_option_is_one_line_before_the_model_loads(run, inputs, tmp_path, capsys, options, message):
    spec_only = tmp_path / "spec_only"  # no weights: loading the model would fail with another message
    spec_only.mkdir()
    shutil.copy(run / "model.json", spec_only / "model.json")
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli(["predict", "-m", str(spec_only), "-i", str(inputs), "-o", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def _cases(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("dataset", ["Dataset099_SynthTest", "Dataset011_AbdomenA"])
def test_evaluate_predictions_reproduces_evaluate(run, tiny_synth, tmp_path, dataset):
    data = tiny_synth / "nnUNet_raw" / dataset
    assert (
        cli(["evaluate", "--model", str(run), "--data", str(data), "--output", str(tmp_path / "model")]) == 0
    )
    pred = tmp_path / "pred"
    assert cli(["predict", "-m", str(run), "-i", str(data / "imagesTr"), "-o", str(pred)]) == 0
    assert {p.name.replace("_0000", "") for p in (data / "imagesTr").iterdir()} <= {
        p.name for p in pred.iterdir()
    }
    out = tmp_path / "folder"
    assert cli(["evaluate", "--predictions", str(pred), "--data", str(data), "--output", str(out)]) == 0
    want = json.loads((tmp_path / "model" / "metrics.json").read_text())
    got = json.loads((out / "metrics.json").read_text())
    assert got["summary"] == want["summary"] and got["organs"] == want["organs"]
    assert _cases(out / "cases.csv") == _cases(tmp_path / "model" / "cases.csv")
    assert len(_cases(out / "cases.csv")) == len(want["organs"]) * want["cases"]


def test_evaluate_takes_the_label_mapping_options_of_finetuning(run, tiny_synth, tmp_path, capsys):
    data = tiny_synth / "nnUNet_raw" / "Dataset011_AbdomenA"
    labels = json.loads((data / "dataset.json").read_text())["labels"]
    first = next(name for name, i in labels.items() if i == 1)
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(run), "--data", str(data), "--output", str(out)]
    assert cli([*args, f"data.ignore_labels.Dataset011_AbdomenA=[{first}]"]) == 0
    scored = json.loads((out / "metrics.json").read_text())["organs"]
    assert cli(args) == 0
    full = json.loads((out / "metrics.json").read_text())["organs"]
    assert len(full) == len(scored) + 1 and scored == [o for o in full if o in scored]  # one organ fewer
    capsys.readouterr()
    assert cli([*args, "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "takes only data.label_map" in err and len(err.strip().splitlines()) == 1
    assert cli(["evaluate", "--data", str(data)]) == 2
    assert "exactly one of --model" in capsys.readouterr().err


def test_a_stage2_export_predicts_as_the_run_does(run, inputs, tmp_path):
    export = tmp_path / "export"
    assert cli(["export", str(run), "-o", str(export)]) == 0
    assert {"config.json", "model.safetensors"} <= {p.name for p in export.iterdir()}
    model = mosmos.from_pretrained(export)
    assert (
        model.kind == "segmenter" and model.organs == json.loads((run / "model.json").read_text())["organs"]
    )
    label = model.segment(inputs / "scan-07.nii.gz")
    out = tmp_path / "out"
    assert cli(["predict", "-m", str(export), "-i", str(inputs / "scan-07.nii.gz"), "-o", str(out)]) == 0
    np.testing.assert_array_equal(label, np.asarray(nib.load(out / "scan-07.nii.gz").dataobj))
    assert cli(["info", str(export)]) == 0
