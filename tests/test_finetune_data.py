"""Stage 2 data: seeded splits and subsets, dataset balance, and patches seeded per (epoch, index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosmos.config import load_config
from mosmos.errors import ConfigError
from mosmos.finetune.config import FinetuneConfig
from mosmos.finetune.data import _split, build_seg_data, build_train_dataset, case_weights, resolve_preprocess
from mosmos.segdata.layouts import SegCase
from mosmos.vocabulary import load_vocabulary
from tests.conftest import REPO


def _cases(n, name="D"):
    return [SegCase(f"{name}_{i:03d}", f"/x/{i}.nii.gz", f"/y/{i}.nii.gz", name) for i in range(n)]


def test_sqrt_balance_gives_each_dataset_a_share_proportional_to_the_root_of_its_size():
    w = case_weights([0] * 4 + [1] * 16, "sqrt")
    np.testing.assert_allclose(w.sum(), 1.0)
    # case weights 1/2 and 1/4 -> dataset shares 4/2 : 16/4 = 2 : 4
    np.testing.assert_allclose([w[:4].sum(), w[4:].sum()], [1 / 3, 2 / 3])
    eq = case_weights([0] * 4 + [1] * 16, "equal")
    np.testing.assert_allclose([eq[:4].sum(), eq[4:].sum()], [0.5, 0.5])
    prop = case_weights([0] * 4 + [1] * 16, "proportional")
    np.testing.assert_allclose(prop, np.full(20, 1 / 20))


def test_split_is_seeded_disjoint_and_lower_fractions_keep_a_subset():
    cases = _cases(20)
    train, val = _split(cases, 0.2, 1.0, seed=0, salt=0)
    assert len(val) == 4 and len(train) == 16
    assert not {c.case_id for c in train} & {c.case_id for c in val}
    assert _split(cases, 0.2, 1.0, seed=0, salt=0) == (train, val)
    assert _split(cases, 0.2, 1.0, seed=1, salt=0)[1] != val
    half, val_half = _split(cases, 0.2, 0.5, seed=0, salt=0)
    quarter, _ = _split(cases, 0.2, 0.25, seed=0, salt=0)
    assert val_half == val  # the fraction never changes the validation cases
    assert len(half) == 8 and len(quarter) == 4
    assert {c.case_id for c in quarter} <= {c.case_id for c in half} <= {c.case_id for c in train}
    assert len(_split(cases, 0.2, 0.01, seed=0, salt=0)[0]) == 1  # never empty


def test_label_count_subsets_are_nested_seeded_and_leave_validation_alone():
    cases = _cases(20)
    full, val = _split(cases, 0.2, 1.0, seed=3, salt=7)
    subsets = {n: _split(cases, 0.2, 1.0, seed=3, salt=7, max_cases=n) for n in (1, 2, 4, 8, 100)}
    for n, (train, v) in subsets.items():
        assert v == val and len(train) == min(n, 16)
    ids = {n: {c.case_id for c in t} for n, (t, _) in subsets.items()}
    assert ids[1] <= ids[2] <= ids[4] <= ids[8] <= ids[100] == {c.case_id for c in full}
    assert subsets[4] == _split(cases, 0.2, 1.0, seed=3, salt=7, max_cases=4)  # seeded
    others = {
        frozenset(c.case_id for c in _split(cases, 0.2, 1.0, seed=s, salt=7, max_cases=4)[0])
        for s in range(5)
    }
    assert len(others) > 1  # another seed draws other cases
    # a count after a fraction: the fraction's subset, capped, still nested in it
    half, _ = _split(cases, 0.2, 0.5, seed=3, salt=7)
    capped, _ = _split(cases, 0.2, 0.5, seed=3, salt=7, max_cases=3)
    assert len(capped) == 3 and {c.case_id for c in capped} <= {c.case_id for c in half}


def _cfg(tiny_synth, tmp_path, *extra):
    raw = tiny_synth / "nnUNet_raw"
    datasets = ",".join(
        str(raw / d) for d in ("Dataset011_AbdomenA", "Dataset012_KidneyB", "Dataset013_VesselsC")
    )
    return load_config(
        FinetuneConfig,
        REPO / "configs" / "finetune" / "demo.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.datasets=[{datasets}]",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.patch_size=[32,32,16]",
            "data.spacing=[10.0,10.0,14.0]",
            "data.val_fraction=0.5",
            *extra,
        ],
    )


def test_tasks_organs_and_lookup_tables_from_the_generated_datasets(tiny_synth, tmp_path):
    cfg = _cfg(tiny_synth, tmp_path)
    data = build_seg_data(cfg, load_vocabulary(None))
    assert [t.name for t in data.tasks] == [
        "Dataset011_AbdomenA",
        "Dataset012_KidneyB",
        "Dataset013_VesselsC",
    ]
    assert "duodenum" in data.organs and "urinary_bladder" in data.organs and "liver" in data.organs
    kidney_b = data.tasks[1]
    assert set(kidney_b.organs) == {
        "kidney_right",
        "kidney_left",
        "gallbladder",
        "duodenum",
        "urinary_bladder",
    }
    assert sum(kidney_b.labelled) == 5
    # KidneyB's "Kidney (L)" is its id 2 -> the kidney_left channel
    assert kidney_b.lut[2] == data.organs.index("kidney_left") + 1
    assert len(data.train) == 3 and len(data.val) == 3  # 2 cases each: one to train, one to validate


def test_patches_are_seeded_by_epoch_and_index_and_only_labelled_organs_are_foreground(tiny_synth, tmp_path):
    cfg = _cfg(tiny_synth, tmp_path, "data.foreground_fraction=1.0")
    data = build_seg_data(cfg, load_vocabulary(None))
    data.preprocess = resolve_preprocess(cfg, None)
    ds = build_train_dataset(cfg, data, tmp_path / "run")
    a, b = ds[0], ds[0]
    assert a["image"].shape == (1, 32, 32, 16) and a["label"].shape == (1, 32, 32, 16)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], a["image"])
    for i in range(len(ds)):
        item = ds[i]
        present = {int(k) for k in torch.unique(item["label"]) if k > 0}
        labelled = {c + 1 for c in torch.nonzero(item["labelled"]).flatten().tolist()}
        assert present <= labelled, (present, labelled)
        assert present  # foreground_fraction=1: every patch is centred on an organ
        assert item["task"].item() in (0, 1, 2)


def test_augment_options_reach_the_patches(tiny_synth, tmp_path):
    """With every random augmentation step off, a patch equals the same patch drawn without
    augmentation; with noise always on, it differs."""
    quiet = "data.augment_options={affine_prob: 0, intensity_prob: 0, noise_prob: 0}"
    items = {}
    for name, extra in (
        ("quiet", [quiet]),
        ("plain", ["data.augment=false"]),
        ("noisy", ["data.augment_options={noise_prob: 1}"]),
    ):
        cfg = _cfg(tiny_synth, tmp_path, *extra)
        data = build_seg_data(cfg, load_vocabulary(None))
        data.preprocess = resolve_preprocess(cfg, None)
        items[name] = build_train_dataset(cfg, data, tmp_path / "run")[0]["image"]
    assert torch.equal(items["quiet"], items["plain"])
    assert not torch.equal(items["noisy"], items["plain"])
    with pytest.raises(ConfigError, match=r"data\.augment_options: unknown key 'rotate'"):
        _cfg(tiny_synth, tmp_path, "data.augment_options={rotate: 5}")
