"""The shuffled-report control (``data.shuffle_reports``): every scan gets another scan's report."""

from __future__ import annotations

import numpy as np
import pytest

from mosmos.pretrain.data import derangement
from tests.test_pretrain_data import _write_table
from tests.test_transforms import write_phantom


@pytest.mark.parametrize("n", [2, 3, 10, 101])
@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_derangement_moves_every_index_and_is_seeded(n, seed):
    perm = derangement(n, seed)
    assert sorted(perm.tolist()) == list(range(n))  # a permutation
    assert not (perm == np.arange(n)).any()  # no fixed point
    assert np.array_equal(derangement(n, seed), perm)  # the same draw for the same seed


def test_derangements_vary_with_the_seed_and_cover_every_one_of_three():
    # n = 3 has exactly two derangements, the two 3-cycles; a sampler stuck on one would fail here
    assert {tuple(derangement(3, s).tolist()) for s in range(40)} == {(1, 2, 0), (2, 0, 1)}
    assert len({tuple(derangement(10, s).tolist()) for s in range(20)}) == 20


def test_fewer_than_two_items_cannot_be_deranged():
    for n in (0, 1):
        with pytest.raises(ValueError, match=f"n={n}"):
            derangement(n, 0)


def test_build_datasets_pairs_every_scan_with_another_report(tmp_path):
    """Through the config: each case's report (and the tags parsed from it) is another case's."""
    from mosmos.config import load_config
    from mosmos.pretrain.config import PretrainConfig
    from mosmos.pretrain.data import build_datasets
    from mosmos.pretrain.tags import tag_matrix
    from mosmos.vocabulary import load_vocabulary

    findings = ["Liver normal.", "Spleen absent.", "Kidneys normal.", "No gallbladder.", "Pancreas normal."]
    rows = []
    for i, text in enumerate(findings):
        write_phantom(tmp_path / "vol", f"case{i}")
        rows.append({"VolumeName": f"case{i}.nii.gz", "Findings_EN": text, "Impressions_EN": f"Case {i}."})
    table = _write_table(tmp_path / "reports.csv", rows)
    own = {f"case{i}": f"FINDINGS: {text}\nIMPRESSION: Case {i}." for i, text in enumerate(findings)}
    base = [
        f"output_dir={tmp_path / 'run'}",
        f"data.table={table}",
        f"data.image_root={tmp_path / 'vol'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.2",
        "data.check=none",
    ]
    for seed in range(3):
        cfg = load_config(PretrainConfig, None, [*base, "data.shuffle_reports=true", f"seed={seed}"])
        vocab = load_vocabulary(cfg.data.vocabulary)
        data = build_datasets(cfg, vocab)
        records = data.train.records + data.val.records
        assert sorted(r["report"] for r in records) == sorted(own.values())  # the same reports, moved
        assert all(r["report"] != own[r["case_id"]] for r in records)
        for ds in (data.train, data.val):
            assert np.array_equal(ds.tags.numpy(), tag_matrix([r["report"] for r in ds.records], vocab))
    plain = build_datasets(load_config(PretrainConfig, None, base), vocab)
    assert all(r["report"] == own[r["case_id"]] for r in plain.train.records + plain.val.records)
