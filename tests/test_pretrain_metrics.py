"""Stage 1 metrics against hand-worked cases and independent computations."""

from __future__ import annotations

import itertools

import matplotlib.image
import numpy as np
import pytest
import torch

from mosmos.pretrain.metrics import (
    average_precision,
    finding_auroc,
    pointing_game,
    retrieval_recall,
    retrieval_recall_from_similarity,
    save_attention_overlays,
    tag_auroc_ap,
)


# ----------------------------------------------------------------------------- retrieval
def test_retrieval_recall_known_similarity():
    sim = np.array([[0.9, 0.1, 0.2], [0.8, 0.5, 0.1], [0.3, 0.2, 0.7]])
    r = retrieval_recall_from_similarity(sim, ks=(1, 2, 5))
    # image 1 ranks report 0 above its own; every report finds its own image first
    assert r["i2t_R@1"] == pytest.approx(2 / 3) and r["i2t_R@2"] == 1.0
    assert r["t2i_R@1"] == 1.0
    assert r["i2t_R@5"] == r["t2i_R@5"] == 1.0  # k >= N
    assert r["i2t_MedR"] == 1.0


def test_retrieval_ties_are_not_rewarded():
    r = retrieval_recall_from_similarity(np.ones((4, 4)), ks=(1, 4))
    assert r["i2t_R@1"] == r["t2i_R@1"] == 0.0 and r["i2t_R@4"] == 1.0


def test_retrieval_from_embeddings_uses_cosine():
    emb = torch.eye(5)
    r = retrieval_recall(emb * torch.arange(1, 6)[:, None], emb, ks=(1,))  # scale does not matter
    assert r["i2t_R@1"] == r["t2i_R@1"] == 1.0
    r = retrieval_recall(emb, emb.roll(1, dims=0), ks=(1, 2))  # image i matches report i+1
    assert r["i2t_R@1"] == 0.0 and r["i2t_R@2"] == 0.0  # own report scores 0, tied with 3 others
    with pytest.raises(ValueError):
        retrieval_recall(emb, emb[:3])


# ----------------------------------------------------------------------------- AP / AUROC
def test_average_precision_hand_worked():
    # ranks: +, -, +, -  ->  precision 1/1 at recall 0.5, 2/3 at recall 1
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a tie forms one threshold: {+,-} at 0.5 -> P 1/2, R 1/2; then + at 0.2 -> P 2/3, R 1
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.25 + 0.5 * 2 / 3)
    assert average_precision([0.1, 0.2], [1, 1]) == 1.0


def test_average_precision_matches_precision_at_each_positive():
    rng = np.random.default_rng(0)
    s, y = rng.random(40), rng.random(40) < 0.3
    order = np.argsort(-s)
    ranks = np.flatnonzero(y[order]) + 1  # 1-based ranks of the positives
    expected = np.mean(np.arange(1, len(ranks) + 1) / ranks)
    assert average_precision(s, y) == pytest.approx(expected)


def _pairwise_auroc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])


def test_tag_auroc_ap_hand_worked():
    logits = np.array(
        [
            [0.9, 0.1, 0.3],
            [0.8, 0.9, 0.2],
            [0.7, 0.5, 0.1],
            [0.6, 0.3, 0.0],
        ]
    )
    targets = np.array([[1, 1, 1], [0, -1, 1], [1, 0, -1], [0, -1, 1]])
    r = tag_auroc_ap(logits, targets, ["liver", "spleen", "kidney"])
    liver, spleen, kidney = (r["per_tag"][k] for k in ("liver", "spleen", "kidney"))
    assert liver["auroc"] == pytest.approx(0.75) and liver["ap"] == pytest.approx(5 / 6)
    # spleen: only rows 0 (pos, 0.1) and 2 (neg, 0.5) are known
    assert spleen["auroc"] == pytest.approx(0.0) and spleen["ap"] == pytest.approx(0.5)
    assert (spleen["n_pos"], spleen["n_neg"]) == (1, 1)
    assert kidney["auroc"] is None and kidney["ap"] is None  # one class only
    assert r["mean_auroc"] == pytest.approx(0.375) and r["mean_ap"] == pytest.approx((5 / 6 + 0.5) / 2)
    assert r["n_tags_scored"] == 2


def test_tag_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(1)
    logits = rng.integers(0, 4, size=(30, 2)).astype(float)  # many ties
    targets = rng.integers(-1, 2, size=(30, 2))
    r = tag_auroc_ap(torch.from_numpy(logits), torch.from_numpy(targets), ["a", "b"])
    for t, name in enumerate("ab"):
        known = targets[:, t] >= 0
        assert r["per_tag"][name]["auroc"] == pytest.approx(
            _pairwise_auroc(logits[known, t], targets[known, t])
        )
    with pytest.raises(ValueError, match="1, 0 or -1"):
        tag_auroc_ap(logits, targets + 2, ["a", "b"])


# ----------------------------------------------------------------------------- pointing game
def _pointing_case():
    labels = torch.zeros(2, 1, 8, 8, 8, dtype=torch.int16)
    labels[:, 0, 1:4, 1:4, 1:4] = 1  # liver
    labels[:, 0, 4:7, 4:7, 4:7] = 2  # spleen
    attn = torch.zeros(2, 3, 4, 4, 4)
    attn[0, 0, 1, 1, 1] = 1  # liver -> inside the liver: hit
    attn[0, 1, 0, 0, 0] = 1  # spleen -> corner: miss, on the border
    attn[0, 2, 2, 2, 2] = 1  # kidney (no label id): border check only
    attn[1, 0, 1, 1, 1] = 1  # liver not valid in scan 1: ignored
    attn[1, 1, 2, 2, 2] = 1  # spleen -> inside the spleen: hit
    attn[1, 2, 3, 1, 1] = 1  # kidney on the border
    valid = torch.tensor([[True, True, True], [False, True, True]])
    return attn, labels, [1, 2, None], valid


@pytest.mark.parametrize("mode", ["trilinear", "nearest"])
def test_pointing_game_constructed_maps(mode):
    attn, labels, ids, valid = _pointing_case()
    r = pointing_game(attn, labels, ids, valid, names=["liver", "spleen", "kidney"], mode=mode)
    assert (r["pointing_hits"], r["pointing_count"]) == (2, 3)
    assert r["pointing_game"] == pytest.approx(2 / 3)
    assert r["border_fraction"] == pytest.approx(2 / 5)
    assert r["per_organ"] == {"liver": 1.0, "spleen": 0.5, "kidney": None}


def test_pointing_game_same_resolution_and_empty():
    attn, labels, ids, valid = _pointing_case()
    small = labels[:, :, ::2, ::2, ::2]  # labels on the attention grid
    r = pointing_game(attn, small, ids, valid)
    assert r["pointing_count"] == 3 and "per_organ" not in r
    none = pointing_game(attn, labels, ids, torch.zeros_like(valid))
    assert none["pointing_game"] is None and none["border_fraction"] is None
    assert none["attention_mass"] is None


def test_pointing_game_attention_mass():
    """The energy variant: one-hot cells carried to the label grid, and random maps checked in numpy."""
    attn, labels, ids, valid = _pointing_case()
    r = pointing_game(attn, labels, ids, valid, names=["liver", "spleen", "kidney"], mode="nearest")
    # liver cell (1,1,1) covers voxels 2:4, all liver; spleen's corner cell none of the spleen;
    # scan 1's spleen cell (2,2,2) covers voxels 4:6, all spleen
    assert r["per_organ_mass"] == {"liver": 1.0, "spleen": 0.5, "kidney": None}
    assert r["attention_mass"] == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    maps = rng.random((3, 2, 6, 5, 4)) ** 4
    lab = rng.integers(0, 3, size=(3, 1, 6, 5, 4))
    ok = np.ones((3, 2), dtype=bool)
    r = pointing_game(torch.from_numpy(maps), torch.from_numpy(lab), [1, 2], torch.from_numpy(ok))
    expected = np.mean(
        [maps[s, t][lab[s, 0] == t + 1].sum() / maps[s, t].sum() for s in range(3) for t in range(2)]
    )
    assert r["attention_mass"] == pytest.approx(expected)


def test_finding_auroc_against_normal_organs_by_hand():
    """Scans 0-1 normal liver, 2 lesion, 3 lesion + fatty, 4 liver out of view (skipped), 5 no entry."""
    states = [
        {"liver": {"status": "normal", "findings": []}},
        {"liver": {"status": "normal", "findings": []}},
        {"liver": {"status": "abnormal", "findings": ["liver_lesion"]}},
        {"liver": {"status": "abnormal", "findings": ["liver_lesion", "fatty_liver"]}},
        {"liver": {"status": "out_of_view", "findings": []}},
        {},
    ]
    logits = np.array([[0.5, 9], [0.1, 9], [0.3, 9], [2.0, 9], [9.0, 9], [9.0, 9]])  # col 1: spleen
    r = finding_auroc(logits, states, ["liver", "spleen"])
    # lesion: positives 0.3, 2.0 vs negatives 0.5, 0.1 -> pairs won 1 + 2 of 4; fatty: 2.0 beats both
    assert r == {"liver/liver_lesion": pytest.approx(0.75), "liver/fatty_liver": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="must be"):
        finding_auroc(logits[:3], states, ["liver", "spleen"])


def test_pointing_game_tolerance_and_peak_distance():
    """Peaks off the organ by a hand-computed distance in mm (anisotropic voxels), and random cases
    checked against scipy's Euclidean distance transform."""
    from scipy.ndimage import distance_transform_edt

    labels = torch.zeros(3, 1, 8, 8, 8, dtype=torch.int16)
    labels[:, 0, 2:4, 2:4, 2:4] = 1
    attn = torch.zeros(3, 1, 8, 8, 8)
    attn[0, 0, 3, 3, 3] = 1  # inside: 0 mm
    attn[1, 0, 5, 3, 3] = 1  # two voxels along x from voxel (3, 3, 3): 2 * 2 mm
    attn[2, 0, 3, 3, 6] = 1  # three voxels along z from (3, 3, 3): 3 * 5 mm
    valid = torch.ones(3, 1, dtype=torch.bool)
    r = pointing_game(attn, labels, [1], valid, names=["liver"], spacing=(2, 3, 5), tolerance_mm=10)
    assert r["pointing_game"] == pytest.approx(1 / 3)
    assert r["pointing_tolerant"] == pytest.approx(2 / 3)  # 0 and 4 mm within 10 mm, 15 mm not
    assert r["peak_distance_mm"] == pytest.approx(4.0)  # median of 0, 4, 15
    assert r["per_organ_tolerant"] == {"liver": pytest.approx(2 / 3)}
    assert r["per_organ_distance"] == {"liver": pytest.approx(4.0)}
    exact = pointing_game(attn, labels, [1], valid, spacing=(2, 3, 5), tolerance_mm=0)
    assert exact["pointing_tolerant"] == pytest.approx(exact["pointing_game"])

    rng = np.random.default_rng(1)
    maps = torch.from_numpy(rng.random((4, 2, 6, 7, 5)))
    lab = torch.from_numpy(rng.integers(0, 3, size=(4, 1, 6, 7, 5)) * (rng.random((4, 1, 6, 7, 5)) < 0.2))
    ok = torch.ones(4, 2, dtype=torch.bool)
    spacing = (1.5, 2.0, 4.0)
    r = pointing_game(maps, lab, [1, 2], ok, spacing=spacing, tolerance_mm=3.0)
    dist = []
    for s in range(4):
        for t in range(2):
            peak = np.unravel_index(int(maps[s, t].argmax()), maps.shape[2:])
            dist.append(distance_transform_edt(lab[s, 0].numpy() != t + 1, sampling=spacing)[peak])
    assert r["peak_distance_mm"] == pytest.approx(float(np.median(dist)))
    assert r["pointing_tolerant"] == pytest.approx(np.mean(np.array(dist) <= 3.0))
    with pytest.raises(ValueError, match="needs spacing"):
        pointing_game(maps, lab, [1, 2], ok, tolerance_mm=3.0)
    with pytest.raises(ValueError, match="spacing must be 3"):
        pointing_game(maps, lab, [1, 2], ok, spacing=(1, 1))


# ----------------------------------------------------------------------------- overlays
def test_save_attention_overlays(tmp_path):
    image = torch.rand(1, 16, 16, 8)
    attn = torch.zeros(2, 8, 8, 4)
    attn[0, 2, 3, 1] = 1
    attn[1, 6, 6, 3] = 1
    paths = save_attention_overlays(image, attn, ["liver", "left kidney"], tmp_path / "viz", "case7")
    assert [p.name for p in paths] == ["case7_liver.png", "case7_left_kidney.png"]
    # written atomically: no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "viz").iterdir()) == sorted(p.name for p in paths)
    png = matplotlib.image.imread(paths[0])
    assert png.ndim == 3 and png.shape[0] > 50
    with pytest.raises(ValueError):
        save_attention_overlays(image, attn, ["liver"], tmp_path, "x")


def test_compute_metrics_reports_each_organ():
    """Per-organ pointing and tag AUROC in metrics.json, worked by hand: two scans, two organs."""
    from mosmos.pretrain.evaluate import compute_metrics

    labels = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    labels[:, :, :2] = 1  # organ "a" fills the x < 2 half, organ "b" the other
    labels[:, :, 2:] = 2
    attn = torch.zeros(2, 2, 4, 4, 4)
    attn[0, 0, 0, 0, 0] = attn[1, 0, 3, 0, 0] = 1.0  # "a": a hit, then a miss
    attn[:, 1, 3, 3, 3] = 1.0  # "b": two hits
    tags = torch.tensor([[[1, 1], [1, 0]], [[1, 0], [1, 1]]])
    logits = torch.tensor([[[0.0, 2.0], [0.0, -1.0]], [[0.0, 1.0], [0.0, 3.0]]])
    outputs = {"tags": tags, "tag_logits": logits, "attn_maps": attn, "labels": labels, "text_emb": None}
    m = compute_metrics(outputs, ["a", "b"], [1, 2])
    assert m["pointing_game"] == pytest.approx(3 / 4)
    assert m["pointing_game/a"] == pytest.approx(0.5) and m["pointing_game/b"] == pytest.approx(1.0)
    assert m["tag_AUROC/a/abnormal"] == pytest.approx(1.0) and m["tag_AUROC/b/abnormal"] == pytest.approx(1.0)
    assert "tag_AUROC/a/present" not in m  # one class only: no AUROC
