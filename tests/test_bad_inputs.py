"""Bad input to ``mosmos check``: every broken dataset or table gives one clear message naming the file.

Each case starts from a small valid input, breaks one thing, and checks that ``mosmos check`` reports
exactly that problem (file and what is wrong) and that the CLI exits 1 without a traceback.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import shutil

import numpy as np
import pytest

from mosmos.check.datasets import check_seg_dataset
from mosmos.check.tables import check_report_table
from mosmos.cli import main as cli
from mosmos.vocabulary import load_vocabulary
from tests.small_inputs import ct_image, label_map, nifti, nnunet_dataset, report_table, truncate


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


def _zero_pixdim(path):
    """Save a valid image, then zero its first voxel axis: srow_x[0] (bytes 280-283 of the NIfTI-1
    header, the sform nibabel and MONAI take the affine from) and pixdim[1] (bytes 80-83), with the
    qform disabled (qform_code, bytes 252-253)."""
    nifti(path, ct_image())
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[80:84] = np.float32(0.0).tobytes()
    raw[280:284] = np.float32(0.0).tobytes()
    raw[252:254] = np.int16(0).tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


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
        lambda r: truncate(r / "imagesTr/b_0000.nii.gz"),
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
        lambda r: nifti(r / "labelsTr/c.nii.gz", np.zeros((10, 10, 5), np.uint8)),
        "labelsTr/c.nii.gz",
        r"shape \(10, 10, 5\) differs from its image's \(10, 10, 6\)",
    ),
    "affine mismatch": (
        lambda r: nifti(r / "labelsTr/c.nii.gz", label_map(), origin=(0.0, 0.0, 30.0)),
        "labelsTr/c.nii.gz",
        r"affine differs from its image's",
    ),
    "undeclared label id": (
        lambda r: nifti(r / "labelsTr/a.nii.gz", np.where(label_map() == 2, 7, label_map()).astype(np.uint8)),
        "labelsTr/a.nii.gz",
        r"label id\(s\) \[7\] are not declared",
    ),
    "fractional label": (
        lambda r: nifti(r / "labelsTr/a.nii.gz", label_map().astype(np.float32) * 0.5),
        "labelsTr/a.nii.gz",
        r"non-integer voxel value",
    ),
    "NaN voxels": (
        lambda r: nifti(
            r / "imagesTr/a_0000.nii.gz", np.where(label_map() == 1, np.nan, 0.0).astype(np.float32)
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
            nifti(r / f"{k}/a{s}.nii.gz", d, zooms=(2.0, 2.0, 25.0))
            for k, s, d in (("imagesTr", "_0000", ct_image()), ("labelsTr", "", label_map()))
        ],
        "imagesTr/a_0000.nii.gz",
        r"exceeds 10 mm",
    ),
    "4D volume": (
        lambda r: nifti(r / "imagesTr/a_0000.nii.gz", np.stack([ct_image()] * 3, axis=-1)),
        "imagesTr/a_0000.nii.gz",
        r"4D image of shape \(10, 10, 6, 3\)",
    ),
}


@pytest.mark.parametrize("name", list(DATASET_CASES))
def test_check_names_the_file_and_the_problem(tmp_path, vocab, capsys, name):
    root = nnunet_dataset(tmp_path / "Dataset001_Ok")
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
    root = nnunet_dataset(tmp_path / "Dataset002_Many", cases=("a", "b", "c", "d", "e"))
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
    nifti(root / "imagesTr/d_0000.nii.gz", ct_image(), zooms=(2.0, 2.0, 40.0))
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
    bad_json = nnunet_dataset(tmp_path / "Dataset003_Json")
    (bad_json / "dataset.json").write_text("{not json")
    [p] = check_seg_dataset(bad_json, vocab).errors
    assert p.path == str(bad_json) and "not valid JSON" in p.message
    unmapped = nnunet_dataset(
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
def _check_table(path, **kw):
    report, records = check_report_table(path, image_root=path.parent / "images", **kw)
    return report, records


def test_a_clean_table_passes(tmp_path):
    report, records = _check_table(report_table(tmp_path))
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
    path = report_table(tmp_path, rows)
    if name == "truncated image":
        truncate(tmp_path / "images/s2.nii.gz")
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
    report, records = _check_table(report_table(tmp_path, rows))
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
    path = report_table(tmp_path)
    if content is not None:
        path.write_text(content)
    report, _ = check_report_table(path)  # default image root: the table's folder (not images/)
    [err] = report.errors
    assert err.path == str(path) and re.search(pattern, err.message), err.message
    capsys.readouterr()
    assert cli(["check", str(path)]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_check_a_pretrain_or_finetune_config(tmp_path, capsys):
    report_table(tmp_path)
    cfg = tmp_path / "pre.yaml"
    cfg.write_text(f"data:\n  table: {tmp_path / 'reports.csv'}\n  image_root: {tmp_path / 'images'}\n")
    assert cli(["check", "--config", str(cfg)]) == 0
    root = nnunet_dataset(tmp_path / "Dataset005_Cfg", labels={"background": 0, "leber": 1, "spleen": 2})
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"data:\n  datasets: [{root}]\n")
    capsys.readouterr()
    assert cli(["check", "--config", str(cfg), "--csv", str(tmp_path / "problems.csv")]) == 1
    assert "leber" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "problems.csv").open()))
    assert rows and rows[0]["target"].startswith("Dataset005_Cfg") and "leber" in rows[0]["message"]
    cfg.write_text(f"data:\n  datasets: [{root}]\n  label_map: {{Dataset005_Cfg: {{leber: liver}}}}\n")
    assert cli(["check", "--config", str(cfg)]) == 0
