"""Bad input: every broken table, dataset, config or checkpoint gives one clear message naming the file.

Each case starts from a small valid input, breaks one thing, and checks that ``mosmos check`` reports
exactly that problem (file and what is wrong), that the CLI exits 1 without a traceback, and, for the
training checks, that ``data.on_bad_case`` errors or skips with a record.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from mosmos.check import check_report_table, check_seg_dataset
from mosmos.cli import main as cli
from mosmos.errors import ConfigError, DataError
from mosmos.vocabulary import load_vocabulary

SHAPE = (10, 10, 6)


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


def _nifti(path, data, zooms=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0)):
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = origin
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_zooms(tuple(zooms) + tuple(img.header.get_zooms()[3:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _image(seed=0):
    return np.random.default_rng(seed).integers(-150, 250, SHAPE).astype(np.int16)


def _label():
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:5, 2:5, 1:3] = 1
    lab[6:8, 6:8, 2:4] = 2
    return lab


def _dataset(root, cases=("a", "b", "c"), labels=None):
    labels = labels or {"background": 0, "liver": 1, "spleen": 2}
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": labels,
                "numTraining": len(cases),
                "file_ending": ".nii.gz",
            }
        )
    )
    for i, c in enumerate(cases):
        _nifti(root / "imagesTr" / f"{c}_0000.nii.gz", _image(i))
        _nifti(root / "labelsTr" / f"{c}.nii.gz", _label())
    return root


def _zero_pixdim(path):
    """Save a valid image, then zero its first voxel axis: srow_x[0] (bytes 280-283 of the NIfTI-1
    header, the sform nibabel and MONAI take the affine from) and pixdim[1] (bytes 80-83), with the
    qform disabled (qform_code, bytes 252-253)."""
    _nifti(path, _image())
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[80:84] = np.float32(0.0).tobytes()
    raw[280:284] = np.float32(0.0).tobytes()
    raw[252:254] = np.int16(0).tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# (mutation, file expected at fault relative to the dataset, message pattern)
DATASET_CASES = {
    "image without label": (
        lambda r: (r / "labelsTr/b.nii.gz").unlink(),
        "imagesTr/b_0000.nii.gz",
        r"no label map",
    ),
    "label without image": (
        lambda r: shutil.copy(r / "labelsTr/a.nii.gz", r / "labelsTr/z.nii.gz"),
        "labelsTr/z.nii.gz",
        r"without an image",
    ),
    "truncated gzip": (
        lambda r: _truncate(r / "imagesTr/b_0000.nii.gz"),
        "imagesTr/b_0000.nii.gz",
        r"cannot read image",
    ),
    "not a NIfTI": (
        lambda r: (r / "labelsTr/b.nii.gz").write_bytes(b"hello, not a volume"),
        "labelsTr/b.nii.gz",
        r"cannot read label map",
    ),
    "empty file": (
        lambda r: (r / "imagesTr/c_0000.nii.gz").write_bytes(b""),
        "imagesTr/c_0000.nii.gz",
        r"empty file",
    ),
    "shape mismatch": (
        lambda r: _nifti(r / "labelsTr/c.nii.gz", np.zeros((10, 10, 5), np.uint8)),
        "labelsTr/c.nii.gz",
        r"shape \(10, 10, 5\) differs from its image's \(10, 10, 6\)",
    ),
    "affine mismatch": (
        lambda r: _nifti(r / "labelsTr/c.nii.gz", _label(), origin=(0.0, 0.0, 30.0)),
        "labelsTr/c.nii.gz",
        r"affine differs from its image's",
    ),
    "undeclared label id": (
        lambda r: _nifti(r / "labelsTr/a.nii.gz", np.where(_label() == 2, 7, _label()).astype(np.uint8)),
        "labelsTr/a.nii.gz",
        r"label id\(s\) \[7\] are not declared",
    ),
    "fractional label": (
        lambda r: _nifti(r / "labelsTr/a.nii.gz", _label().astype(np.float32) * 0.5),
        "labelsTr/a.nii.gz",
        r"non-integer voxel value",
    ),
    "NaN voxels": (
        lambda r: _nifti(
            r / "imagesTr/a_0000.nii.gz", np.where(_label() == 1, np.nan, 0.0).astype(np.float32)
        ),
        "imagesTr/a_0000.nii.gz",
        r"\d+ NaN/inf voxel",
    ),
    "zero spacing": (
        lambda r: _zero_pixdim(r / "imagesTr/a_0000.nii.gz"),
        "imagesTr/a_0000.nii.gz",
        r"voxel size 0 x 2 x 3 mm is zero, negative or not finite",
    ),
    "absurd spacing": (
        lambda r: [
            _nifti(r / f"{k}/a{s}.nii.gz", d, zooms=(2.0, 2.0, 25.0))
            for k, s, d in (("imagesTr", "_0000", _image()), ("labelsTr", "", _label()))
        ],
        "imagesTr/a_0000.nii.gz",
        r"exceeds 10 mm",
    ),
    "4D volume": (
        lambda r: _nifti(r / "imagesTr/a_0000.nii.gz", np.stack([_image()] * 3, axis=-1)),
        "imagesTr/a_0000.nii.gz",
        r"4D image of shape \(10, 10, 6, 3\)",
    ),
}


@pytest.mark.parametrize("name", list(DATASET_CASES))
def test_check_names_the_file_and_the_problem(tmp_path, vocab, capsys, name):
    root = _dataset(tmp_path / "Dataset001_Ok")
    mutate, fault, pattern = DATASET_CASES[name]
    mutate(root)
    report = check_seg_dataset(root, vocab)
    errors = report.errors
    at_fault = [p for p in errors if p.path.endswith(fault)]
    assert at_fault, f"{name}: no error for {fault}; got {[str(p) for p in report.problems]}"
    assert any(re.search(pattern, p.message) for p in at_fault), [p.message for p in at_fault]
    # only the broken case is blamed (the "absurd spacing" case rewrites a's image and label map)
    assert {p.case for p in errors} <= {fault.split("/")[1].split("_0000")[0].split(".")[0]}
    capsys.readouterr()
    assert cli(["check", str(root)]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert fault in out.out and "FAILED" in out.out


def test_a_clean_dataset_passes_and_every_problem_is_reported_at_once(tmp_path, vocab, capsys):
    root = _dataset(tmp_path / "Dataset002_Many", cases=("a", "b", "c", "d", "e"))
    assert not check_seg_dataset(root, vocab).problems
    assert cli(["check", str(root)]) == 0
    for name in (
        "image without label",
        "truncated gzip",
        "shape mismatch",
        "NaN voxels",
        "undeclared label id",
    ):
        mutate, *_ = DATASET_CASES[name]
        mutate(root)
    _nifti(root / "imagesTr/d_0000.nii.gz", _image(), zooms=(2.0, 2.0, 40.0))
    report = check_seg_dataset(root, vocab)
    faults = {p.path.split(root.name + "/")[1] for p in report.errors}
    assert faults >= {
        "imagesTr/b_0000.nii.gz",
        "labelsTr/c.nii.gz",
        "imagesTr/a_0000.nii.gz",
        "labelsTr/a.nii.gz",
        "imagesTr/d_0000.nii.gz",
    }
    assert "labelsTr/d.nii.gz" in {
        p.path.split(root.name + "/")[1] for p in report.errors
    }  # affine vs its image
    assert report.bad_cases() == {(root.name, c) for c in "abcd"}


def test_dataset_level_problems(tmp_path, vocab):
    bad_json = _dataset(tmp_path / "Dataset003_Json")
    (bad_json / "dataset.json").write_text("{not json")
    [p] = check_seg_dataset(bad_json, vocab).errors
    assert p.path == str(bad_json) and "not valid JSON" in p.message
    unmapped = _dataset(
        tmp_path / "Dataset004_Names", labels={"background": 0, "liver": 1, "flux_capacitor": 2}
    )
    [p] = check_seg_dataset(unmapped, vocab).errors
    assert "flux_capacitor" in p.message and "label_map" in p.message
    datalist = tmp_path / "list.json"
    entries = [{"image": f"imagesTr/{c}_0000.nii.gz", "label": f"labelsTr/{c}.nii.gz"} for c in ("a", "b")]
    datalist.write_text(
        json.dumps({"labels": {"1": "liver", "2": "spleen"}, "training": [*entries, entries[0]]})
    )
    shutil.copytree(unmapped / "imagesTr", tmp_path / "imagesTr")
    shutil.copytree(unmapped / "labelsTr", tmp_path / "labelsTr")
    (tmp_path / "labelsTr/b.nii.gz").unlink()
    report = check_seg_dataset(datalist, vocab)
    messages = sorted(p.message for p in report.errors)
    assert any("duplicate case id 'a_0000'" in m for m in messages)
    assert any("not found" in m and "case 'b_0000'" in m for m in messages)


# ---------------------------------------------------------------------------------------- tables
def _table(tmp_path, rows=None, name="reports.csv"):
    images = tmp_path / "images"
    for i in range(4):
        if not (images / f"s{i}.nii.gz").exists():
            _nifti(images / f"s{i}.nii.gz", _image(i))
    rows = rows or [
        [f"s{i}.nii.gz", f"The liver is normal. Case {i}.", "No acute findings."] for i in range(4)
    ]
    path = tmp_path / name
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", "Findings_EN", "Impressions_EN"])
        w.writerows(rows)
    return path


def _check_table(path, **kw):
    report, records = check_report_table(path, image_root=path.parent / "images", **kw)
    return report, records


def test_a_clean_table_passes(tmp_path):
    report, records = _check_table(_table(tmp_path))
    assert not report.problems and len(records) == 4


@pytest.mark.parametrize(
    "name",
    ["empty report", "duplicate case id", "image missing", "no image value", "truncated image", "non-UTF-8"],
)
def test_table_row_problems(tmp_path, capsys, name):
    rows = [[f"s{i}.nii.gz", f"The liver is normal. Case {i}.", "Fine."] for i in range(4)]
    expect = {
        "empty report": (2, r"row 2 \(s2\.nii\.gz\): the report is empty"),
        "duplicate case id": (3, r"row 3: duplicate case id 's1' \(also on row 1\).*left out"),
        "image missing": (1, r"image of row 1 of reports\.csv not found"),
        "no image value": (0, r"row 0: no image in column 'VolumeName'"),
        "truncated image": (2, r"cannot read image"),
        "non-UTF-8": (None, r"line 3: byte \d+ \(0xe9\) is not valid UTF-8"),
    }[name]
    if name == "empty report":
        rows[2][1:] = ["", ""]
    elif name == "duplicate case id":
        rows[3][0] = "s1.nii.gz"
    elif name == "image missing":
        rows[1][0] = "absent.nii.gz"
    elif name == "no image value":
        rows[0][0] = ""
    path = _table(tmp_path, rows)
    if name == "truncated image":
        _truncate(tmp_path / "images/s2.nii.gz")
    if name == "non-UTF-8":
        lines = path.read_bytes().split(b"\n")
        lines[2] = lines[2].replace(b"normal", b"norm\xe9l")  # latin-1 "é"
        path.write_bytes(b"\n".join(lines))
    report, records = _check_table(path)
    [err] = report.errors
    assert re.search(expect[1], err.message), err.message
    # a duplicate leaves both rows out (which one is right is ambiguous)
    assert len(records) == {None: 4, 3: 2}.get(expect[0], 3)
    capsys.readouterr()
    assert cli(["check", str(path), "--image-root", str(tmp_path / "images")]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err and "ERROR" in out.out


def test_identical_reports_are_a_warning_not_an_error(tmp_path, capsys):
    rows = [[f"s{i}.nii.gz", "Normal study.", ""] for i in range(4)]
    report, records = _check_table(_table(tmp_path, rows))
    assert not report.errors and len(records) == 4
    [warning] = report.warnings
    assert "rows [0, 1, 2, 3] (4 rows) have the identical report" in warning.message
    assert cli(["check", str(tmp_path / "reports.csv"), "--image-root", str(tmp_path / "images")]) == 0
    assert (
        cli(["check", "--strict", str(tmp_path / "reports.csv"), "--image-root", str(tmp_path / "images")])
        == 1
    )


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        (
            "missing column",
            "VolumeName,Findings\ns0.nii.gz,x\n",
            r"column\(s\) \['Findings_EN', 'Impressions_EN'\] not found",
        ),
        ("empty table", "", r"empty table"),
        ("wrong images folder", None, r"none of the 4 images is under"),
    ],
)
def test_table_level_problems(tmp_path, capsys, name, content, pattern):
    path = _table(tmp_path)
    if content is not None:
        path.write_text(content)
    report, _ = check_report_table(path)  # default image root: the table's folder (not images/)
    [err] = report.errors
    assert err.path == str(path) and re.search(pattern, err.message), err.message
    capsys.readouterr()
    assert cli(["check", str(path)]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_check_a_pretrain_or_finetune_config(tmp_path, capsys):
    _table(tmp_path)
    cfg = tmp_path / "pre.yaml"
    cfg.write_text(f"data:\n  table: {tmp_path / 'reports.csv'}\n  image_root: {tmp_path / 'images'}\n")
    assert cli(["check", "--config", str(cfg)]) == 0
    root = _dataset(tmp_path / "Dataset005_Cfg", labels={"background": 0, "leber": 1, "spleen": 2})
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"data:\n  datasets: [{root}]\n")
    capsys.readouterr()
    assert cli(["check", "--config", str(cfg), "--csv", str(tmp_path / "problems.csv")]) == 1
    assert "leber" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "problems.csv").open()))
    assert rows and rows[0]["target"].startswith("Dataset005_Cfg") and "leber" in rows[0]["message"]
    cfg.write_text(f"data:\n  datasets: [{root}]\n  label_map: {{Dataset005_Cfg: {{leber: liver}}}}\n")
    assert cli(["check", "--config", str(cfg)]) == 0


# ------------------------------------------------------------------------------ training checks
def _seg_cfg(tmp_path, roots, **data):
    from mosmos.config import load_config
    from mosmos.finetune.config import FinetuneConfig

    overrides = [f"output_dir={tmp_path / 'run'}", "data.datasets=[" + ",".join(map(str, roots)) + "]"]
    overrides += [f"data.{k}={v}" for k, v in data.items()]
    return load_config(FinetuneConfig, None, overrides)


def test_finetune_data_errors_or_skips_bad_cases(tmp_path, vocab):
    from mosmos.finetune.data import build_seg_data

    root = _dataset(tmp_path / "Dataset006_Train", cases=("a", "b", "c", "d", "e"))
    _truncate(root / "labelsTr/c.nii.gz")
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
        _nifti(tmp_path / "images" / f"s{i}.nii.gz", _image(i))
    rows[5][1] = ""
    table = _table(tmp_path, rows)
    _truncate(tmp_path / "images/s2.nii.gz")
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
        ("model.init=/no/such/run", r"stage 1 export /no/such/run does not exist"),
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
