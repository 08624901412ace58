"""Segmentation dataset reading: nnU-Net v2 raw, MSD and MONAI datalist layouts, label mapping, checks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mosmos.check.datasets import check_label_values
from mosmos.errors import ConfigError, DataError
from mosmos.segdata.dataset import SegDataset, read_seg_dataset, seg_dataset_name
from mosmos.segdata.layouts import SegCase
from mosmos.vocabulary import load_vocabulary

SHAPE = (8, 8, 4)
MIXED = {"Kidney (L)": 1, "kidney_right": 2, "Postcava": 3, "Gall Bladder": 4}


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


def _nifti(path: Path, data: np.ndarray | None = None, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(SHAPE, dtype=dtype) if data is None else data
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _nnunet(
    root: Path,
    cases: list[str],
    labels: dict | None = None,
    test: list[str] | None = None,
    test_labels: bool = False,
    **extra,
) -> Path:
    """A tiny nnU-Net v2 raw dataset with empty volumes."""
    for case in cases:
        _nifti(root / "imagesTr" / f"{case}_0000.nii.gz", dtype=np.int16)
        _nifti(root / "labelsTr" / f"{case}.nii.gz")
    for case in test or []:
        _nifti(root / "imagesTs" / f"{case}_0000.nii.gz", dtype=np.int16)
        if test_labels:
            _nifti(root / "labelsTs" / f"{case}.nii.gz")
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **(MIXED if labels is None else labels)},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        **extra,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def _msd(root: Path, train: list[str], test: list[str], labels: dict | None, **extra) -> Path:
    for case in train:
        _nifti(root / "imagesTr" / f"{case}.nii.gz", dtype=np.int16)
        _nifti(root / "labelsTr" / f"{case}.nii.gz")
    for case in test:
        _nifti(root / "imagesTs" / f"{case}.nii.gz", dtype=np.int16)
    meta = {
        "name": "Spleen",
        "modality": {"0": "CT"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train],
        "test": [f"./imagesTs/{c}.nii.gz" for c in test],
        **extra,
    }
    if labels is not None:
        meta["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def test_nnunet_layout_cases_and_mapping(tmp_path, vocab):
    root = _nnunet(tmp_path / "Dataset012_KidneyB", ["KidneyB_0002", "KidneyB_0001"])
    ds = read_seg_dataset(root, vocab)
    assert isinstance(ds, SegDataset)
    assert (ds.name, ds.layout, ds.root) == ("Dataset012_KidneyB", "nnunet", str(root))
    assert ds.labels == {1: "Kidney (L)", 2: "kidney_right", 3: "Postcava", 4: "Gall Bladder"}
    assert ds.label_to_organ == {
        1: "kidney_left",
        2: "kidney_right",
        3: "inferior_vena_cava",
        4: "gallbladder",
    }
    assert ds.ignored == {}
    assert ds.organs == ["kidney_right", "kidney_left", "gallbladder", "inferior_vena_cava"]  # vocab order
    assert [c.case_id for c in ds.train] == ["KidneyB_0001", "KidneyB_0002"]
    assert ds.train[0] == SegCase(
        "KidneyB_0001",
        str(root / "imagesTr" / "KidneyB_0001_0000.nii.gz"),
        str(root / "labelsTr" / "KidneyB_0001.nii.gz"),
        "Dataset012_KidneyB",
    )
    assert ds.test == []
    lut = ds.lookup_table(["liver", "kidney_left", "kidney_right", "gallbladder"])
    assert lut.dtype == np.uint8
    assert lut.tolist() == [0, 2, 3, 0, 4]  # the IVC is not an output channel here
    # the dataset.json path works as well as its folder
    assert read_seg_dataset(root / "dataset.json", vocab).label_to_organ == ds.label_to_organ
    assert seg_dataset_name(root) == "Dataset012_KidneyB"


def test_explicit_label_map_wins_over_synonyms(tmp_path, vocab):
    root = _nnunet(tmp_path / "Dataset001_X", ["a"], labels={"liver": 1, "blob": 2})
    ds = read_seg_dataset(root, vocab, label_map={"blob": "Spleen", "liver": "hepatic parenchyma"})
    # values resolve through label spellings ("Spleen") and report synonyms ("hepatic parenchyma")
    assert ds.label_to_organ == {1: "liver", 2: "spleen"}
    ds = read_seg_dataset(root, vocab, label_map={"liver": "stomach", "blob": "spleen"})
    assert ds.label_to_organ == {1: "stomach", 2: "spleen"}
    with pytest.raises(ConfigError, match=r"'nope' is not a label of .*'liver' \(id 1\), 'blob' \(id 2\)"):
        read_seg_dataset(root, vocab, label_map={"nope": "liver"})
    with pytest.raises(ConfigError, match=r"'splen' is not an organ .*closest organs: spleen"):
        read_seg_dataset(root, vocab, label_map={"blob": "splen"})


def test_ignore_drops_label_and_lut_maps_it_to_background(tmp_path, vocab):
    labels = {"spleen": 1, "tumour": 2, "liver": 3}
    root = _nnunet(tmp_path / "Dataset002_Y", ["a", "b"], labels=labels)
    ds = read_seg_dataset(root, vocab, ignore=["tumour"])
    assert ds.ignored == {2: "tumour"}
    assert ds.label_to_organ == {1: "spleen", 3: "liver"}
    assert ds.organs == ["liver", "spleen"]
    assert ds.lookup_table(["liver", "spleen"]).tolist() == [0, 2, 0, 1]
    # ignoring a mapped organ makes it unlabelled for this dataset
    ds = read_seg_dataset(root, vocab, ignore=["tumour", "Spleen"])
    assert ds.organs == ["liver"]
    assert ds.lookup_table(["liver", "spleen"]).tolist() == [0, 0, 0, 1]
    with pytest.raises(ConfigError, match=r"'kidney' is not a label"):
        read_seg_dataset(root, vocab, ignore=["tumour", "kidney"])
    with pytest.raises(ConfigError, match=r"both mapped .* and ignored"):
        read_seg_dataset(root, vocab, ignore=["tumour"], label_map={"tumour": "liver"})


def test_unmapped_label_error_names_label_and_dataset(tmp_path, vocab):
    root = _nnunet(tmp_path / "Dataset003_Z", ["a"], labels={"spleen": 1, "Livr": 2, "foo": 3})
    with pytest.raises(ConfigError) as err:
        read_seg_dataset(root, vocab)
    msg = str(err.value)
    assert str(root) in msg
    assert "label 'Livr' (id 2)" in msg
    assert "data.label_map.Dataset003_Z.Livr=<organ>" in msg
    assert "data.ignore_labels.Dataset003_Z" in msg
    assert "closest organs: liver" in msg
    assert vocab.source in msg
    assert "'foo' (id 3)" in msg  # every unmapped label is reported at once


def test_two_labels_on_one_organ(tmp_path, vocab):
    root = _nnunet(tmp_path / "Dataset004_W", ["a"], labels={"Kidney (L)": 1, "left kidney": 2})
    with pytest.raises(ConfigError, match=r"'Kidney \(L\)' \(id 1\) and 'left kidney' \(id 2\).*kidney_left"):
        read_seg_dataset(root, vocab)


def test_missing_label_file_is_named(tmp_path, vocab):
    root = _nnunet(tmp_path / "Dataset005_V", ["a", "b"])
    (root / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(DataError, match=r"no label file: missing .*labelsTr/b\.nii\.gz"):
        read_seg_dataset(root, vocab)
    _nifti(root / "labelsTr" / "b.nii.gz")
    _nifti(root / "labelsTr" / "c.nii.gz")
    with pytest.raises(DataError, match=r"label file\(s\) have no image .*labelsTr/c\.nii\.gz"):
        read_seg_dataset(root, vocab)


def test_imagests_split(tmp_path, vocab):
    root = _nnunet(tmp_path / "Dataset006_T", ["a"], test=["t2", "t1"])
    ds = read_seg_dataset(root, vocab)
    assert [(c.case_id, c.label) for c in ds.test] == [("t1", None), ("t2", None)]
    assert ds.test[0].image == str(root / "imagesTs" / "t1_0000.nii.gz")
    root = _nnunet(tmp_path / "Dataset007_T", ["a"], test=["t1"], test_labels=True)
    ds = read_seg_dataset(root, vocab)
    assert ds.test[0].label == str(root / "labelsTs" / "t1.nii.gz")


def test_duplicate_case_id(tmp_path, vocab):
    """imagesTr and imagesTs are separate sets (nnU-Net): a test id repeating a training id is fine,
    for the reader and for `mosmos check`; a duplicate within one set stays an error."""
    from mosmos.check.datasets import check_seg_dataset

    root = _nnunet(tmp_path / "Dataset008_D", ["a", "b"], test=["a"])
    ds = read_seg_dataset(root, vocab)
    assert [c.case_id for c in ds.train] == ["a", "b"] and [c.case_id for c in ds.test] == ["a"]
    assert ds.test[0].image == str(root / "imagesTs" / "a_0000.nii.gz")
    assert not [p for p in check_seg_dataset(root, vocab).errors if "duplicate" in p.message]
    msd = tmp_path / "msd"
    _msd(msd, ["x"], [], {"0": "background", "1": "spleen"})
    meta = json.loads((msd / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"})
    (msd / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"duplicate case id.*'x'"):
        read_seg_dataset(msd, vocab)
    assert [p for p in check_seg_dataset(msd, vocab).errors if "duplicate case id 'x'" in p.message]


def test_region_labels_unsupported(tmp_path, vocab):
    root = _nnunet(tmp_path / "Dataset009_R", ["a"], labels={"whole": [1, 2], "core": 2})
    with pytest.raises(DataError, match=r"region-based labels .*'whole'.* not supported"):
        read_seg_dataset(root, vocab)


def test_multi_channel_unsupported(tmp_path, vocab):
    root = _nnunet(tmp_path / "Dataset010_M", ["a"])
    _nifti(root / "imagesTr" / "a_0001.nii.gz")
    with pytest.raises(DataError, match=r"multi-channel .*'a' has channel\(s\) 0000, 0001"):
        read_seg_dataset(root, vocab)
    root = _nnunet(tmp_path / "Dataset011_M", ["a"], channel_names={"0": "T1", "1": "T2"})
    with pytest.raises(DataError, match=r"multi-channel"):
        read_seg_dataset(root, vocab)
    msd = _msd(tmp_path / "msd", ["x"], [], {"0": "background", "1": "spleen"}, modality={"0": "a", "1": "b"})
    with pytest.raises(DataError, match=r"multi-channel"):
        read_seg_dataset(msd, vocab)


def test_msd_layout(tmp_path, vocab):
    root = _msd(
        tmp_path / "Task09_Spleen",
        ["spleen_2", "spleen_10"],
        ["spleen_1"],
        {"0": "background", "1": "spleen"},
    )
    ds = read_seg_dataset(root, vocab)
    assert (ds.name, ds.layout) == ("Spleen", "msd")
    assert ds.labels == {1: "spleen"}
    assert ds.label_to_organ == {1: "spleen"}
    assert [c.case_id for c in ds.train] == ["spleen_10", "spleen_2"]
    assert ds.train[1].image == str(root / "imagesTr" / "spleen_2.nii.gz")
    assert ds.train[1].label == str(root / "labelsTr" / "spleen_2.nii.gz")
    assert [(c.case_id, c.label) for c in ds.test] == [("spleen_1", None)]
    assert read_seg_dataset(root, vocab, name="MySpleen").train[0].dataset == "MySpleen"
    (root / "labelsTr" / "spleen_2.nii.gz").unlink()
    with pytest.raises(DataError, match=r"not found .*labelsTr/spleen_2\.nii\.gz"):
        read_seg_dataset(root, vocab)


def test_datalist_labels_from_caller_or_error(tmp_path, vocab):
    data = tmp_path / "data"
    for c in ("c1", "c2", "v1"):
        _nifti(data / "img" / f"{c}.nii.gz", dtype=np.int16)
        _nifti(data / "seg" / f"{c}.nii", dtype=np.uint8)
    _nifti(data / "img" / "t1.nii.gz", dtype=np.int16)
    datalist = tmp_path / "lists" / "abdomen_fold0.json"
    datalist.parent.mkdir()
    entry = lambda c: {"image": f"../data/img/{c}.nii.gz", "label": f"../data/seg/{c}.nii"}  # noqa: E731
    datalist.write_text(
        json.dumps(
            {
                "training": [entry("c2"), entry("c1")],
                "validation": [entry("v1")],
                "testing": [{"image": "../data/img/t1.nii.gz"}],
            }
        )
    )
    with pytest.raises(ConfigError, match=r"declares no 'labels'.*data\.labels\.abdomen_fold0="):
        read_seg_dataset(datalist, vocab)
    assert seg_dataset_name(datalist) == "abdomen_fold0"
    ds = read_seg_dataset(datalist, vocab, labels={0: "background", 1: "liver", "2": "RK"})
    assert (ds.name, ds.layout, ds.root) == ("abdomen_fold0", "datalist", str(datalist))
    assert ds.label_to_organ == {1: "liver", 2: "kidney_right"}
    assert [c.case_id for c in ds.train] == ["c1", "c2", "v1"]  # validation cases are labelled training data
    assert ds.train[0].label == str(data / "seg" / "c1.nii")
    assert [(c.case_id, c.label) for c in ds.test] == [("t1", None)]
    with pytest.raises(ConfigError, match=r"data.labels.abdomen_fold0"):
        read_seg_dataset(datalist, vocab, labels={"one": "liver"})
    # paths relative to another base folder
    moved = tmp_path / "flat.json"
    moved.write_text(json.dumps({"training": [{"image": "img/c1.nii.gz", "label": "seg/c1.nii"}]}))
    ds = read_seg_dataset(moved, vocab, labels={1: "liver"}, base_dir=data)
    assert ds.train[0].image == str(data / "img" / "c1.nii.gz")


def test_unsupported_paths(tmp_path, vocab):
    with pytest.raises(DataError, match=r"no dataset.json.*supported layouts"):
        read_seg_dataset(tmp_path, vocab)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"supported layouts"):
        read_seg_dataset(tmp_path / "x.txt", vocab)
    with pytest.raises(DataError, match=r"no such"):
        read_seg_dataset(tmp_path / "missing", vocab)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad.json: not valid JSON"):
        read_seg_dataset(tmp_path / "bad.json", vocab)
    (tmp_path / "other.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(DataError, match=r"not a recognised segmentation dataset"):
        read_seg_dataset(tmp_path / "other.json", vocab)


def test_nnunet_naming_and_numtraining_errors(tmp_path, vocab):
    root = _nnunet(tmp_path / "Dataset020_N", ["a"])
    _nifti(root / "imagesTr" / "stray.nii.gz")
    with pytest.raises(DataError, match=r"stray.nii.gz do not follow the nnU-Net naming"):
        read_seg_dataset(root, vocab)
    root = _nnunet(tmp_path / "Dataset021_N", ["a", "b"], numTraining=3)
    with pytest.raises(DataError, match=r"'numTraining' is 3 but 2"):
        read_seg_dataset(root, vocab)


def test_check_label_values(tmp_path, vocab):
    root = _nnunet(tmp_path / "Dataset030_L", ["a", "b", "c"], labels={"liver": 1, "spleen": 2})
    ds = read_seg_dataset(root, vocab)
    good = np.zeros(SHAPE, dtype=np.float32)
    good[2:4, 2:4, 1:3] = 2.0  # integer-valued floats are fine
    _nifti(root / "labelsTr" / "a.nii.gz", good, dtype=np.float32)
    check_label_values(ds.train[0], ds)
    frac = good.copy()
    frac[0, 0, 0] = 0.5
    _nifti(root / "labelsTr" / "b.nii.gz", frac, dtype=np.float32)
    with pytest.raises(DataError, match=r"labelsTr/b\.nii\.gz: .*non-integer"):
        check_label_values(ds.train[1], ds)
    undeclared = np.zeros(SHAPE, dtype=np.uint8)
    undeclared[1, 1, 1] = 7
    _nifti(root / "labelsTr" / "c.nii.gz", undeclared)
    with pytest.raises(DataError, match=r"labelsTr/c\.nii\.gz: label id\(s\) \[7\] are not declared"):
        check_label_values(ds.train[2], ds)
    _nifti(root / "labelsTr" / "c.nii.gz", np.zeros((8, 8, 5), dtype=np.uint8))
    with pytest.raises(DataError, match=r"shape"):
        check_label_values(ds.train[2], ds)
    (root / "labelsTr" / "c.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"labelsTr/c\.nii\.gz: cannot read"):
        check_label_values(ds.train[2], ds)
    check_label_values(SegCase("t", str(root / "imagesTr" / "a_0000.nii.gz"), None, ds.name), ds)


def test_generated_synth_datasets(tiny_synth, vocab):
    expected = {
        "Dataset011_AbdomenA": [
            "liver",
            "spleen",
            "kidney_right",
            "kidney_left",
            "pancreas",
            "stomach",
            "gallbladder",
            "aorta",
            "inferior_vena_cava",
        ],
        "Dataset012_KidneyB": ["kidney_right", "kidney_left", "gallbladder", "duodenum", "urinary_bladder"],
        "Dataset013_VesselsC": ["pancreas", "stomach", "aorta", "inferior_vena_cava"],
        "Dataset099_SynthTest": [
            "liver",
            "spleen",
            "kidney_right",
            "kidney_left",
            "pancreas",
            "stomach",
            "gallbladder",
            "aorta",
            "duodenum",
            "inferior_vena_cava",
            "urinary_bladder",
        ],
    }
    for folder, organs in expected.items():
        ds = read_seg_dataset(tiny_synth / "nnUNet_raw" / folder, vocab)
        assert ds.layout == "nnunet"
        assert ds.name == folder
        assert ds.organs == organs, folder
        assert ds.ignored == {}
        assert ds.train and all(c.label is not None for c in ds.train)
        prefix = folder.split("_", 1)[1]
        assert all(c.case_id.startswith(prefix + "_") for c in ds.train)
        check_label_values(ds.train[0], ds)
