"""Bad input to a run: broken cases, configs and model files stop it before training, or are skipped.

With ``data.on_bad_case: error`` a run names every bad case and stops; with ``skip`` it trains on the
rest and records them. Config mistakes and unreadable model files fail before any data is read.
"""

from __future__ import annotations

import csv
import gzip
import json
import re

import pytest

from mosmos.cli import main as cli
from mosmos.errors import ConfigError, DataError
from mosmos.vocabulary import load_vocabulary
from tests.small_inputs import ct_image, nifti, nnunet_dataset, report_table, truncate


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


# ------------------------------------------------------------------------------ training checks
def _seg_cfg(tmp_path, roots, **data):
    from mosmos.config import load_config
    from mosmos.finetune.config import FinetuneConfig

    overrides = [f"output_dir={tmp_path / 'run'}", "data.datasets=[" + ",".join(map(str, roots)) + "]"]
    overrides += [f"data.{k}={v}" for k, v in data.items()]
    return load_config(FinetuneConfig, None, overrides)


def test_finetune_data_errors_or_skips_bad_cases(tmp_path, vocab):
    from mosmos.finetune.data import build_seg_data

    root = nnunet_dataset(tmp_path / "Dataset006_Train", cases=("a", "b", "c", "d", "e"))
    truncate(root / "labelsTr/c.nii.gz")
    (root / "labelsTr/e.nii.gz").unlink()
    with pytest.raises(
        DataError,
        match=r"(?s)2 problem\(s\) in 2 case\(s\).*labelsTr/c\.nii\.gz: cannot read.*on_bad_case=skip",
    ):
        build_seg_data(_seg_cfg(tmp_path, [root], val_fraction=0.5), vocab)
    data = build_seg_data(_seg_cfg(tmp_path, [root], on_bad_case="skip", val_fraction=0.5), vocab)
    used = {c.case_id for c, _ in data.train + data.val}
    assert used == {"a", "b", "d"}
    assert {p.case for p in data.skipped} == {"c", "e"}
    # the check results are cached per file: a second build reads no volume again
    cache = json.loads((tmp_path / ".cache/finetune/checks.json").read_text())
    assert len(cache) >= 6
    data2 = build_seg_data(
        _seg_cfg(tmp_path, [root], on_bad_case="skip", check="none", val_fraction=0.5), vocab
    )
    assert {c.case_id for c, _ in data2.train + data2.val} == {
        "a",
        "b",
        "c",
        "d",
    }  # "none": unreadable c kept


def test_pretrain_skips_bad_rows_and_records_them(tmp_path):
    """A real (tiny) stage 1 run with a truncated image and an empty report: skip mode trains on the
    rest and writes RUN/skipped.csv; error mode stops before training and names both."""
    from tests.conftest import REPO, tiny_pretrain_overrides

    rows = [
        [f"s{i}.nii.gz", f"The liver is normal. The spleen is {'enlarged' if i % 2 else 'normal'}.", ""]
        for i in range(8)
    ]
    for i in range(4, 8):
        nifti(tmp_path / "images" / f"s{i}.nii.gz", ct_image(i))
    rows[5][1] = ""
    table = report_table(tmp_path, rows)
    truncate(tmp_path / "images/s2.nii.gz")
    base = tiny_pretrain_overrides(
        tmp_path, tmp_path / "run", **{"train.epochs": 1, "data.val_fraction": 0.25}
    )
    base = [o for o in base if not o.startswith(("data.table=", "data.image_root=", "data.ground_truth="))]
    base += [f"data.table={table}", f"data.image_root={tmp_path / 'images'}", "data.ground_truth=null"]
    config = str(REPO / "configs/pretrain/demo.yaml")
    assert cli(["pretrain", "--config", config, *base]) == 2
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert cli(["pretrain", "--config", config, *base, "data.on_bad_case=skip"]) == 0
    skipped = list(csv.DictReader((tmp_path / "run" / "skipped.csv").open()))
    assert {r["case"] for r in skipped} == {"s2", "s5"}
    assert (tmp_path / "run" / "encoder.safetensors").is_file()


# --------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "override, pattern",
    [
        ("data.on_bad_case=ignore", r"data\.on_bad_case.*'error', 'skip'"),
        ("data.check=deep", r"data\.check.*'full', 'header', 'none'"),
        ("train.lr=-0.1", r"train\.lr"),
        (
            "data.patch_size=[40,40,20]",
            r"data\.patch_size=\[40, 40, 20\] must be divisible by 16.*\[32, 32, 16\] or \[48, 48, 32\]",
        ),
        ("train.resume=/no/such/checkpoint", r"train\.resume='/no/such/checkpoint': no such checkpoint"),
        ("model.init=/no/such/run", r"encoder export /no/such/run does not exist"),
    ],
)
def test_finetune_config_errors_fail_before_training(tiny_synth, tmp_path, capsys, override, pattern):
    from tests.conftest import REPO
    from tests.test_finetune_e2e import tiny_finetune_overrides

    run = tmp_path / "run"
    args = [
        "finetune",
        "--config",
        str(REPO / "configs/finetune/demo.yaml"),
        *tiny_finetune_overrides(tiny_synth, run),
    ]
    capsys.readouterr()
    assert cli([*args, override]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    assert not (run / "checkpoints").exists()


def test_pretrain_size_not_divisible_fails_before_reading_data(tmp_path, capsys):
    from tests.conftest import REPO

    args = [
        "pretrain",
        "--config",
        str(REPO / "configs/pretrain/demo.yaml"),
        f"output_dir={tmp_path / 'run'}",
    ]
    args += [f"data.table={tmp_path / 'absent.csv'}", "data.size=[60,64,32]"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "data.size=[60, 64, 32] must be divisible by 16" in err  # not the missing table: no data was read


# ----------------------------------------------------------------------------------- checkpoints
def test_broken_model_files_are_named(tmp_path, tiny_synth, capsys):
    from tests.conftest import REPO

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_text("{}")
    (run / "model.safetensors").write_bytes(b"\x00" * 20)
    data = tiny_synth / "nnUNet_raw" / "Dataset099_SynthTest"
    assert cli(["evaluate", "--model", str(run), "--data", str(data), "--output", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert str(run / "model.json") in err and "Traceback" not in err
    export = tmp_path / "stage1"
    export.mkdir()
    (export / "encoder.json").write_text(
        json.dumps({"format": "mosmos-encoder-v1", "architecture": "rescnn3d", "encoder_kwargs": {}})
    )
    with gzip.open(export / "encoder.safetensors", "wb") as f:  # not a safetensors file
        f.write(b"junk")
    args = ["finetune", "--config", str(REPO / "configs/finetune/demo.yaml"), f"output_dir={tmp_path / 'ft'}"]
    assert cli([*args, f"model.init={export}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {export / 'encoder.safetensors'}" in err and "Traceback" not in err


def test_a_misspelled_pretrain_key_is_a_clear_error(tmp_path):
    from mosmos.config import load_config
    from mosmos.pretrain.config import PretrainConfig

    with pytest.raises(ConfigError, match=r"unknown key"):
        load_config(PretrainConfig, None, ["data.tabel=x.csv"])
