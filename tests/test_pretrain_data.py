"""Report tables (mosmos.table), splits, the image–report dataset and collator (mosmos.pretrain.data)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import nibabel as nib
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from mosmos.errors import ConfigError, DataError
from mosmos.pretrain.data import ImageReportDataset, ReportCollator, split_cases
from mosmos.table import read_report_table
from mosmos.transforms import PreprocessConfig
from tests.test_transforms import write_phantom

ROWS = [
    {"VolumeName": "a_1.nii.gz", "Findings_EN": "Liver normal.", "Impressions_EN": "No acute findings."},
    {"VolumeName": "b_1.nii", "Findings_EN": "Spleen absent.", "Impressions_EN": None},
    {"VolumeName": "c_1.nii.gz", "Findings_EN": "", "Impressions_EN": "NA"},
]


def _write_table(path, rows=ROWS):
    suffix = path.suffix
    if suffix == ".csv":
        datasets.Dataset.from_list(rows).to_pandas().to_csv(path, index=False)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


# ----------------------------------------------------------------------------- table
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_read_report_table_formats(tmp_path, suffix):
    table = _write_table(tmp_path / f"reports{suffix}")
    recs = read_report_table(table, check_images=False)
    assert [r["case_id"] for r in recs] == ["a_1", "b_1", "c_1"]
    assert recs[0]["image"] == str(tmp_path / "a_1.nii.gz")
    assert recs[0]["report"] == "FINDINGS: Liver normal.\nIMPRESSION: No acute findings."
    assert recs[1]["report"] == "FINDINGS: Spleen absent."  # empty column skipped
    assert recs[2]["report"] == "IMPRESSION: NA"  # text "NA" is text, not missing
    assert [r["row"] for r in recs] == [0, 1, 2]
    assert list(tmp_path.iterdir()) == [table]  # nothing written next to the data


def test_read_report_table_paths_and_columns(tmp_path):
    rows = [
        {"path": "0012.nii.gz", "text": "Kidneys normal."},
        {"path": "/abs/x.nii.gz", "text": "Liver cyst."},
        {"path": "0013.nii.gz", "text": "  "},  # empty report: dropped
    ]
    table = tmp_path / "t.csv"
    table.write_text("path,text\n" + "".join(f"{r['path']},{r['text']}\n" for r in rows))
    recs = read_report_table(
        table, image_column="path", report_columns=["text"], image_root=tmp_path / "img", check_images=False
    )
    assert [r["case_id"] for r in recs] == ["0012", "x"]  # leading zeros kept
    assert recs[0]["image"] == str(tmp_path / "img" / "0012.nii.gz")
    assert recs[1]["image"] == "/abs/x.nii.gz"
    assert recs[0]["report"] == "Kidneys normal."  # a single column is used as is


def test_read_report_table_finds_ct_rate_layout(tmp_path):
    nested = tmp_path / "dataset" / "train" / "train_7" / "train_7_a"
    nested.mkdir(parents=True)
    (nested / "train_7_a_2.nii.gz").write_bytes(b"")
    table = _write_table(
        tmp_path / "r.jsonl",
        [{"VolumeName": "train_7_a_2.nii.gz", "Findings_EN": "x", "Impressions_EN": "y"}],
    )
    (rec,) = read_report_table(table, image_root=tmp_path / "dataset")
    assert rec["image"] == str(nested / "train_7_a_2.nii.gz")


def test_read_report_table_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_report_table(tmp_path / "missing.csv")
    xlsx = tmp_path / "t.xlsx"
    xlsx.write_text("x")
    with pytest.raises(DataError, match=r"t\.xlsx.*supported: \.csv"):
        read_report_table(xlsx)
    table = _write_table(tmp_path / "r.csv")
    with pytest.raises(DataError, match=r"\['Image'\] not found.*VolumeName"):
        read_report_table(table, image_column="Image")
    with pytest.raises(DataError, match=r"\['Report'\] not found"):
        read_report_table(table, report_columns=["Report"])
    empty = _write_table(
        tmp_path / "e.jsonl", [{"VolumeName": "a.nii.gz", "Findings_EN": "", "Impressions_EN": None}]
    )
    with pytest.raises(DataError, match=r"e\.jsonl: every report is empty"):
        read_report_table(empty)
    with pytest.raises(DataError, match=r"r\.csv: 3 of 3 image file\(s\) not found"):
        read_report_table(table)
    broken = tmp_path / "b.parquet"
    broken.write_text("not parquet")
    with pytest.raises(DataError, match=r"b\.parquet: cannot read as PARQUET"):
        read_report_table(broken)


# ----------------------------------------------------------------------------- split
def test_split_cases_deterministic_disjoint_covering():
    tr, va = split_cases(50, 0.2, seed=3)
    tr2, va2 = split_cases(50, 0.2, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert len(va) == 10 and not set(tr) & set(va)
    assert sorted([*tr, *va]) == list(range(50))
    assert not np.array_equal(split_cases(50, 0.2, seed=4)[1], va)
    assert [len(x) for x in split_cases(3, 0.01, seed=0)] == [2, 1]  # at least one each side
    assert [len(x) for x in split_cases(5, 0.0, seed=0)] == [5, 0]
    with pytest.raises(ConfigError):
        split_cases(10, 1.0, seed=0)


# ----------------------------------------------------------------------------- dataset
CFG = PreprocessConfig(spacing=(2, 2, 2), size=(16, 16, 16))


@pytest.fixture
def cases(tmp_path):
    paths = [write_phantom(tmp_path / "vol", f"case{i}") for i in range(3)]
    records = [
        {"case_id": f"case{i}", "image": str(img), "report": f"report {i} liver", "row": i}
        for i, (img, _) in enumerate(paths)
    ]
    tags = np.random.default_rng(0).integers(-1, 2, size=(3, 4, 2)).astype(np.int8)
    return records, tags, [lab for _, lab in paths]


def test_dataset_items(cases, tmp_path):
    records, tags, labels = cases
    ds = ImageReportDataset(records, tags, CFG, cache_dir=tmp_path / "cache", label_paths=labels)
    assert len(ds) == 3
    first = ds[1]  # computed, then read back from the cache
    for item in (first, ds[1]):
        assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
        assert type(item["image"]) is torch.Tensor  # no MetaTensor baggage
        assert item["body_mask"].dtype == torch.bool and item["body_mask"].shape == (1, 16, 16, 16)
        assert item["labels"].dtype == torch.int16 and item["labels"].shape == (1, 16, 16, 16)
        assert torch.equal(item["tags"], torch.from_numpy(tags[1]))
        assert (item["report"], item["index"], item["case_id"]) == ("report 1 liver", 1, "case1")
    assert torch.equal(first["image"], ds[1]["image"])
    assert "labels" not in ImageReportDataset(records, tags, CFG)[0]


def _batch(ds, indices):
    from torch.utils.data import default_collate

    items = [ds[i] for i in indices]
    keys = [k for k in ("image", "body_mask", "labels", "index") if k in items[0]]
    return {k: default_collate([it[k] for it in items]) for k in keys}


def test_dataset_augmentation_seeded(cases):
    """Items are never augmented; augment_batch draws per (seed, epoch, index): the same sample
    gets the same draw in any batch, a new one in the next epoch, and images and labels move together."""
    records, tags, labels = cases
    ds = ImageReportDataset(records, tags, CFG, train=True, augment={"affine_prob": 1}, label_paths=labels)
    plain = ImageReportDataset(records, tags, CFG, label_paths=labels)
    assert torch.equal(ds[0]["image"], plain[0]["image"])
    whole = ds.augment_batch(_batch(ds, [0, 1, 2]))
    alone = ds.augment_batch(_batch(ds, [2]))
    assert not torch.equal(whole["image"][2], plain[2]["image"])
    assert torch.equal(whole["image"][2], alone["image"][0]) and torch.equal(
        whole["labels"][2], alone["labels"][0]
    )
    assert whole["labels"].dtype == torch.int16 and whole["body_mask"].dtype == torch.bool
    ds.set_epoch(1)
    assert not torch.equal(ds.augment_batch(_batch(ds, [2]))["image"][0], alone["image"][0])
    assert plain.augment_batch(_batch(plain, [2])) is not None
    assert torch.equal(plain.augment_batch(_batch(plain, [2]))["image"][0], plain[2]["image"])


def test_build_datasets_passes_augment_options(cases, tmp_path):
    """data.augment_options reaches the training set: with every random step switched off, a
    training item equals the unaugmented volume; the defaults change it."""
    from mosmos.config import load_config
    from mosmos.pretrain.config import PretrainConfig
    from mosmos.pretrain.data import build_datasets
    from mosmos.vocabulary import load_vocabulary

    records, _, _ = cases
    rows = [
        {"VolumeName": Path(r["image"]).name, "Findings_EN": "Normal liver.", "Impressions_EN": "None."}
        for r in records
    ]
    table = _write_table(tmp_path / "reports.csv", rows)  # 3 rows: 2 train, 1 val
    base = [
        f"output_dir={tmp_path / 'run'}",
        f"data.table={table}",
        f"data.image_root={tmp_path / 'vol'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.spacing=[2,2,2]",
        "data.size=[16,16,16]",
        "data.val_fraction=0.34",
        "data.check=none",
    ]
    off = "data.augment_options={affine_prob: 0, intensity_prob: 0, noise_prob: 0}"
    cfg = load_config(PretrainConfig, None, [*base, off])
    vocab = load_vocabulary(cfg.data.vocabulary)
    quiet = build_datasets(cfg, vocab).train
    plain = ImageReportDataset(quiet.records, quiet.tags, quiet.preprocess, cache_dir=tmp_path / "cache")
    assert torch.equal(quiet.augment_batch(_batch(quiet, [0]))["image"][0], plain[0]["image"])
    noisy = build_datasets(
        load_config(PretrainConfig, None, [*base, "data.augment_options={noise_prob: 1}"]), vocab
    ).train
    assert not torch.equal(noisy.augment_batch(_batch(noisy, [0]))["image"][0], plain[0]["image"])
    with pytest.raises(ConfigError, match=r"data\.augment_options: unknown key 'rotate'.*rotate_deg"):
        load_config(PretrainConfig, None, [*base, "data.augment_options={rotate: 5}"])
    with pytest.raises(ConfigError, match=r"data\.augment_options\.noise_prob must be in \[0, 1\]"):
        load_config(PretrainConfig, None, [*base, "data.augment_options={noise_prob: 2}"])


def test_dataset_errors(cases, tmp_path):
    records, tags, _ = cases
    with pytest.raises(DataError, match="tags must have shape"):
        ImageReportDataset(records, tags[:2], CFG)
    with pytest.raises(DataError, match="label map"):
        ImageReportDataset(records, tags, CFG, label_paths=[tmp_path / "nope.nii.gz"] * 3)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"garbage")
    bad = [{**records[0], "image": str(corrupt)}]
    with pytest.raises(DataError, match=r"corrupt\.nii\.gz: cannot load"):
        ImageReportDataset(bad, tags[:1], CFG)[0]
    air = tmp_path / "air.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), -1000, np.float32), np.eye(4)), air)
    with pytest.raises(DataError, match=r"air\.nii\.gz: no voxel above body_threshold_hu"):
        ImageReportDataset([{**records[0], "image": str(air)}], tags[:1], CFG)[0]


# ----------------------------------------------------------------------------- collator
def _tokenizer() -> PreTrainedTokenizerFast:
    words = ["[PAD]", "[UNK]", "report", "liver", "0", "1", "2"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_collator_batches_and_tokenizes(cases):
    records, tags, labels = cases
    records[2]["report"] = "liver"
    ds = ImageReportDataset(records, tags, CFG, label_paths=labels)
    loader = DataLoader(ds, batch_size=3, collate_fn=ReportCollator(_tokenizer(), max_length=2))
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 1, 16, 16, 16) and batch["body_mask"].dtype == torch.bool
    assert batch["tags"].shape == (3, 4, 2) and batch["labels"].shape == (3, 1, 16, 16, 16)
    assert batch["input_ids"].tolist() == [[2, 4], [2, 5], [3, 0]]  # truncated to 2, padded with 0
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 1], [1, 0]]
    assert batch["case_id"] == ["case0", "case1", "case2"] and batch["index"] == [0, 1, 2]
    assert batch["report"][2] == "liver"


def test_ground_truth_findings_are_optional_and_bad_ones_named(tmp_path):
    from mosmos.pretrain.data import _findings

    records = [{"case_id": "a"}, {"case_id": "b"}]
    assert _findings(tmp_path, records) is None  # no findings.json: nothing to score
    path = tmp_path / "findings.json"
    path.write_text(
        json.dumps({"a": {"organs": {"liver": {"status": "normal", "findings": []}}}, "b": {"organs": {}}})
    )
    assert _findings(tmp_path, records) == [{"liver": {"status": "normal", "findings": []}}, {}]
    with pytest.raises(DataError, match=r"findings\.json has no organs entry for case 'c'"):
        _findings(tmp_path, [{"case_id": "c"}])
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"findings\.json is not valid JSON"):
        _findings(tmp_path, records)
