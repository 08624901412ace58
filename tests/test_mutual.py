"""Deep mutual learning (train.strategy=mutual): the losses against hand-worked values, the
pseudo-label merge, the ensemble, and a tiny two-stage run followed by evaluate and predict."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from mosmos.cli import main as cli
from mosmos.models.mutual_losses import (
    IgnoreBCEDiceLoss,
    feature_difference_loss,
    feature_similarity_loss,
    ignore_index,
    merge_pseudo_labels,
    mutual_consistency_loss,
    prediction_difference_loss,
)
from mosmos.models.seg_losses import MaskedBCEDiceLoss
from tests.conftest import REPO
from tests.test_finetune_e2e import tiny_finetune_overrides

# ------------------------------------------------------------------------------- pseudo labels


def test_true_labels_win_and_the_band_is_ignored():
    # 3 organs; the case's dataset labels organ 0 only; organs 1 and 2 come from the peers
    label = torch.tensor([1, 0, 0, 0, 0, 1])
    labelled = torch.tensor([True, False, False])
    predicted = torch.tensor([True, True, True])
    probs = torch.tensor(
        [
            [0.0, 0.99, 0.99, 0.99, 0.99, 0.0],  # organ 0: labelled, so never a pseudo label
            [0.95, 0.90, 0.10, 0.50, 0.05, 0.0],  # organ 1
            [0.99, 0.20, 0.05, 0.10, 0.30, 0.9],  # organ 2
        ]
    )
    out = merge_pseudo_labels(label, labelled, probs, predicted, high=0.8, low=0.2)
    ign = ignore_index(3)
    # v0: true label 1 although organ 2 is at 0.99; v1: organ 1 confident; v2: all <= low;
    # v3: best 0.5 in the band; v4: best 0.3 in the band; v5: true label wins over 0.9
    assert out.tolist() == [1, 2, 0, ign, ign, 1]


def test_organs_no_peer_segments_never_become_pseudo_labels():
    label = torch.zeros(2, dtype=torch.long)
    probs = torch.tensor([[0.9, 0.9], [0.95, 0.1]])
    out = merge_pseudo_labels(label, torch.tensor([False, False]), probs, torch.tensor([True, False]))
    assert out.tolist() == [1, 1]  # organ 1 (0.95) is not predicted by any peer
    with pytest.raises(ValueError, match="low < high"):
        merge_pseudo_labels(label, torch.tensor([False, False]), probs, torch.tensor([True, False]), 0.3, 0.5)


# ------------------------------------------------------------------------------------- losses


def test_prediction_difference_is_the_bce_towards_background_on_other_organs():
    logits = torch.tensor([[[0.0, 2.0, -1.0]], [[1.0, 1.0, 1.0]]], requires_grad=True)  # [2, 1, 3]
    other = torch.tensor([[False, True, True], [False, False, False]])
    loss = prediction_difference_loss(logits, other)
    expected = (math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(-1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[0, 0, 0] == 0 and torch.all(logits.grad[1] == 0)
    empty = prediction_difference_loss(logits, torch.zeros_like(other))
    assert empty.item() == 0


def test_feature_difference_is_the_positive_cosine_of_prototypes():
    # features [1, 2, 4]: voxels 0, 1 are own organ a; voxel 2 is other organ o; voxel 3 is other organ p
    features = torch.tensor([[[1.0, 1.0, 1.0, -1.0], [0.0, 2.0, 0.0, 0.0]]], requires_grad=True)
    own = torch.tensor([[[True, True, False, False]]])
    other = torch.tensor([[[False, False, True, False], [False, False, False, True]]])
    loss = feature_difference_loss(features, own, other)
    # prototypes: a = (1, 1), o = (1, 0), p = (-1, 0); cos(a, o) = 1/sqrt(2), cos(a, p) < 0 -> 0
    assert loss.item() == pytest.approx((1 / math.sqrt(2) + 0) / 2, rel=1e-6)
    loss.backward()
    assert torch.all(features.grad[:, :, 3] == 0)  # the negative pair adds nothing


def test_consistency_is_the_bernoulli_kl_to_each_detached_peer():
    a = torch.tensor([[[0.0, 1.0]]], requires_grad=True)
    b = torch.tensor([[[2.0, -1.0]]], requires_grad=True)
    loss = mutual_consistency_loss([a, b])

    def kl(q, p):
        return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))

    pa = [1 / (1 + math.exp(-x)) for x in (0.0, 1.0)]
    pb = [1 / (1 + math.exp(-x)) for x in (2.0, -1.0)]
    expected = (
        np.mean([kl(pb[i], pa[i]) for i in range(2)]) + np.mean([kl(pa[i], pb[i]) for i in range(2)])
    ) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # d/dx_k KL(q || sigmoid(x_k)) = sigmoid(x_k) - q: each model follows its peer, never the reverse
    np.testing.assert_allclose(a.grad[0, 0].numpy(), (np.array(pa) - np.array(pb)) / 4, rtol=1e-4)
    np.testing.assert_allclose(b.grad[0, 0].numpy(), (np.array(pb) - np.array(pa)) / 4, rtol=1e-4)


def test_feature_similarity_pulls_towards_the_best_model_only():
    masks = torch.tensor([[[True, True], [False, True]]])  # [1, 2 organs, 2 voxels]
    f0 = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]], requires_grad=True)  # organ 0 proto (1, 0); organ 1 (1, 0)
    f1 = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]], requires_grad=True)  # organ 0 proto (1, 1); organ 1 (2, 1)
    best = torch.tensor([1, -1])  # model 1 is best on organ 0; no best on organ 1 yet
    loss = feature_similarity_loss([f0, f1], masks, best)
    assert loss.item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    loss.backward()
    assert torch.all(f1.grad == 0)  # the best model's prototype is a stop-gradient target
    assert f0.grad.abs().sum() > 0
    none = feature_similarity_loss([f0, f1], masks, torch.tensor([-1, -1]))
    assert none.item() == 0


def test_ignore_loss_matches_the_masked_loss_without_ignored_voxels_and_skips_them():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 4, (2, 4, 4))
    channels = torch.tensor([[True, False, True], [True, True, True]])
    ours = IgnoreBCEDiceLoss().components(logits, target, channels)
    ref = MaskedBCEDiceLoss().components(logits, target, channels)
    for k in ("loss", "bce", "dice"):
        assert ours[k].item() == pytest.approx(ref[k].item(), rel=1e-5)
    ignored = target.clone()
    ignored[:, 0] = ignore_index(3)
    loss = IgnoreBCEDiceLoss()(logits, ignored, channels)
    loss.backward()
    assert torch.all(logits.grad[:, :, 0] == 0) and torch.all(logits.grad[0, 1] == 0)
    # with the ignored row cut away, the loss is the masked loss of the rest
    ref_rest = MaskedBCEDiceLoss()(logits[:, :, 1:].detach(), target[:, 1:], channels)
    assert loss.item() == pytest.approx(ref_rest.item(), rel=1e-5)


def test_ensemble_returns_the_logit_of_the_mean_probability():
    from mosmos.models.registry import create_image_encoder, create_model

    torch.manual_seed(0)
    encoder = create_image_encoder("rescnn3d", channels=(4, 8), strides=(2, 2), num_res_units=0)
    net = create_model(
        "segmenter", "ensemble", encoder=encoder, num_classes=2, member="unet", members=2
    ).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        mean = torch.stack([torch.sigmoid(m(x)) for m in net.members]).mean(0)
        out = torch.sigmoid(net(x))
    torch.testing.assert_close(out, mean, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def mutual_run(tiny_synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("mutual") / "run"
    test_set = tiny_synth / "nnUNet_raw/Dataset099_SynthTest"
    overrides = tiny_finetune_overrides(
        tiny_synth,
        run,
        **{
            "train.strategy": "mutual",
            "train.epochs": 1,
            "train.deterministic": "false",
            "train.mutual.quality_data": test_set,
            "train.mutual.final": "ensemble",
            "eval.hd95": "false",
        },
    )
    assert cli(["finetune", "--config", str(REPO / "configs/finetune/demo.yaml"), *overrides]) == 0
    return run


def test_a_mutual_run_writes_both_stages_scored_pseudo_labels_and_a_model(mutual_run):
    for name in (
        "model.safetensors",
        "model.json",
        "val_cases.csv",
        "best.json",
        "metrics.json",
        "config.yaml",
    ):
        assert (mutual_run / name).is_file(), name
    spec = json.loads((mutual_run / "model.json").read_text())
    assert spec["strategy"] == "mutual" and spec["name"] == "ensemble" and spec["decoder"]["members"] == 3
    for stage in ("stage_a", "stage_b"):
        for k in range(3):
            assert (mutual_run / stage / f"member_{k}" / "model.safetensors").is_file()
    # stage A members segment their own dataset's organs only
    kidney_b = json.loads((mutual_run / "stage_a/member_1/model.json").read_text())
    assert set(kidney_b["organs"]) == {
        "kidney_right",
        "kidney_left",
        "gallbladder",
        "duodenum",
        "urinary_bladder",
    }
    quality = json.loads((mutual_run / "pseudo_labels/quality.json").read_text())
    # the fully labelled test set scores every organ some dataset leaves unlabelled
    assert set(quality["ground_truth"]["dice"]) == set(spec["organs"])
    assert "held_out_labels" in quality and 0 <= quality["voxels"]["ignored_fraction"] <= 1
    assert (mutual_run / "pseudo_labels/quality.csv").read_text().startswith("source,dataset,case,organ,dice")
    metrics = json.loads((mutual_run / "metrics.json").read_text())
    assert "mean_dice" in metrics["best"] and "pseudo_labels" in metrics


def test_pseudo_labels_keep_every_true_label(mutual_run, tiny_synth):
    from mosmos.config import load_config
    from mosmos.finetune.config import FinetuneConfig
    from mosmos.finetune.data import build_seg_data, cached_train_cases, load_preprocess
    from mosmos.vocabulary import load_vocabulary

    cfg = load_config(FinetuneConfig, str(mutual_run / "config.yaml"), [])
    data = build_seg_data(cfg, load_vocabulary(cfg.data.vocabulary))
    data.preprocess = load_preprocess(cfg)
    cached = cached_train_cases(cfg, data, mutual_run)
    for i, (_, ti) in enumerate(data.train):
        true = data.tasks[ti].lut[np.asarray(cached[i]["label"]).astype(np.int64)][0]
        pseudo = np.load(mutual_run / "pseudo_labels" / f"{i:06d}.npy")
        assert pseudo.shape == true.shape
        assert np.array_equal(pseudo[true > 0], true[true > 0])


def test_evaluate_and_predict_use_the_mutual_model(mutual_run, tiny_synth, tmp_path):
    test_set = tiny_synth / "nnUNet_raw/Dataset099_SynthTest"
    assert (
        cli(
            ["evaluate", "--model", str(mutual_run), "--data", str(test_set), "--output", str(tmp_path / "e")]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "e/metrics.json").read_text())
    assert metrics["cases"] == 1 and len(metrics["organs"]) == 11
    out = tmp_path / "p"
    assert (
        cli(
            [
                "predict",
                "--model",
                str(mutual_run),
                "--input",
                str(test_set / "imagesTr"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    src = sorted((test_set / "imagesTr").glob("*.nii.gz"))[0]
    pred, ref = nib.load(out / src.name.replace("_0000", "")), nib.load(src)
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)


def test_resume_keeps_finished_stages(mutual_run, tiny_synth, capsys):
    overrides = tiny_finetune_overrides(
        tiny_synth,
        mutual_run,
        **{"train.strategy": "mutual", "train.epochs": 1, "train.resume": "latest", "eval.hd95": "false"},
    )
    before = (mutual_run / "stage_a/member_0/model.safetensors").read_bytes()
    assert cli(["finetune", "--config", str(REPO / "configs/finetune/demo.yaml"), *overrides]) == 0
    out = capsys.readouterr().out
    assert "stage_a already done" in out and "stage_b already done" in out
    assert (mutual_run / "stage_a/member_0/model.safetensors").read_bytes() == before
    assert json.loads((mutual_run / "model.json").read_text())["name"] == "unet"  # final: best
