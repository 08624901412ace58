"""MultiTalent's loss (train.strategy=multitalent): hand-worked values, summed valid channels (a
channel's gradient does not depend on how many others are valid), zero gradient elsewhere."""

from __future__ import annotations

import math

import pytest
import torch

from mosmos.finetune.config import FinetuneTrain
from mosmos.models.seg_losses import MaskedBCEDiceLoss, MultiTalentLoss, decode_prediction

SMOOTH = 1e-5


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_hand_worked_value_sums_over_valid_channels():
    # one sample, two voxels, two channels, both valid; voxel 0 is organ 0, voxel 1 is organ 1
    logits = torch.tensor([[[1.0, -1.0], [0.0, 2.0]]])
    target = torch.tensor([[1, 2]])
    labelled = torch.tensor([[True, True]])
    terms = MultiTalentLoss(smooth=SMOOTH).components(logits, target, labelled)
    bce0 = (-math.log(_sig(1.0)) - math.log(1 - _sig(-1.0))) / 2
    bce1 = (-math.log(1 - _sig(0.0)) - math.log(_sig(2.0))) / 2
    p0, p1 = (_sig(1.0), _sig(-1.0)), (_sig(0.0), _sig(2.0))
    dice0 = 1 - (2 * p0[0] + SMOOTH) / (sum(p0) + 1 + SMOOTH)
    dice1 = 1 - (2 * p1[1] + SMOOTH) / (sum(p1) + 1 + SMOOTH)
    assert terms["bce"].item() == pytest.approx(bce0 + bce1, rel=1e-6)  # summed, not averaged
    assert terms["dice"].item() == pytest.approx(dice0 + dice1, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(bce0 + bce1 + dice0 + dice1, rel=1e-6)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_a_channels_gradient_does_not_depend_on_how_many_others_are_valid(batch_dice):
    torch.manual_seed(0)
    base = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 5, (2, 5, 6))
    grads = []
    for others in ([False, False, False], [True, False, False], [True, True, True]):
        logits = base.clone().requires_grad_(True)
        labelled = torch.tensor([[True, *others], [True, False, True, False]])
        MultiTalentLoss(batch_dice=batch_dice)(logits, target, labelled).backward()
        grads.append(logits.grad[:, 0].clone())
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-6, atol=1e-9)
    # the averaged (masked) loss would scale channel 0's gradient with the number of valid channels
    masked = []
    for others in ([False, False, False], [True, True, True]):
        logits = base.clone().requires_grad_(True)
        MaskedBCEDiceLoss()(logits, target, torch.tensor([[True, *others]] * 2)).backward()
        masked.append(logits.grad[:, 0].clone())
    assert not torch.allclose(masked[0], masked[1])


def test_invalid_channels_get_exactly_zero_gradient_even_when_not_finite():
    logits = torch.randn(2, 3, 4, 4)
    logits[0, 1] = float("inf")
    logits.requires_grad_(True)
    target = torch.randint(0, 4, (2, 4, 4))
    labelled = torch.tensor([[True, False, True], [False, False, True]])
    loss = MultiTalentLoss()(logits, target, labelled)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.all(logits.grad[0, 1] == 0) and torch.all(logits.grad[1, :2] == 0)
    assert logits.grad[0, 0].abs().sum() > 0


def test_batch_dice_pools_each_channel_over_the_samples_that_label_it():
    logits = torch.tensor([[[2.0, -2.0]], [[-2.0, 2.0]]])  # [2 samples, 1 channel, 2 voxels]
    target = torch.tensor([[1, 0], [0, 0]])
    terms = MultiTalentLoss(bce_weight=0, smooth=SMOOTH).components(
        logits, target, torch.tensor([[True], [True]])
    )
    p = [_sig(2.0), _sig(-2.0), _sig(-2.0), _sig(2.0)]
    expected = 1 - (2 * p[0] + SMOOTH) / (sum(p) + 1 + SMOOTH)
    assert terms["dice"].item() == pytest.approx(expected, rel=1e-6)
    only_first = MultiTalentLoss(bce_weight=0, smooth=SMOOTH).components(
        logits, target, torch.tensor([[True], [False]])
    )
    assert only_first["dice"].item() == pytest.approx(
        1 - (2 * p[0] + SMOOTH) / (p[0] + p[1] + 1 + SMOOTH), rel=1e-6
    )


def test_multitalent_is_a_strategy_decoded_with_sigmoids():
    assert FinetuneTrain(strategy="multitalent").batch_dice
    logits = torch.tensor([[[3.0, -3.0], [-3.0, 1.0]]])
    assert decode_prediction(logits, "multitalent").tolist() == [[1, 2]]


def test_a_tiny_multitalent_run_trains_and_records_its_strategy(tiny_synth, tmp_path):
    import json

    from mosmos.cli import main as cli
    from tests.conftest import REPO
    from tests.test_finetune_e2e import tiny_finetune_overrides

    run = tmp_path / "run"
    overrides = tiny_finetune_overrides(
        tiny_synth, run, **{"train.strategy": "multitalent", "train.epochs": 1, "eval.hd95": "false"}
    )
    assert cli(["finetune", "--config", str(REPO / "configs/finetune/demo.yaml"), *overrides]) == 0
    assert json.loads((run / "model.json").read_text())["strategy"] == "multitalent"
    assert "mean_dice" in json.loads((run / "metrics.json").read_text())["best"]
