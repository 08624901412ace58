"""Deep supervision (nnU-Net's, as MultiTalent trains): the U-Net's extra outputs, the 1/2^k
weights, the loss at every resolution against an independent computation, a tiny run."""

from __future__ import annotations

import pytest
import torch

from mosmos.models import create_image_encoder, create_model
from mosmos.models.seg_losses import DeepSupervisionLoss, MultiTalentLoss, deep_supervision_weights

torch.set_num_threads(1)


def build(name="unet", strides=(2, 2, 2, 2), **kwargs):
    encoder = create_image_encoder(
        "rescnn3d", channels=(8, 16, 16, 24), strides=strides, num_res_units=1, norm="batch"
    )
    return create_model("segmenter", name, encoder=encoder, num_classes=3, num_tasks=2, **kwargs)


def test_weights_are_nnunets():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    with pytest.raises(ValueError, match="n=0"):
        deep_supervision_weights(0)


@pytest.mark.parametrize(
    ("name", "strides", "sizes"),
    [
        ("unet", (2, 2, 2, 2), [(32, 32, 16), (16, 16, 8), (8, 8, 4)]),  # stem: full, /2, /4
        ("unet", (1, 2, 2, 2), [(32, 32, 16), (16, 16, 8)]),  # no stem: full, /2
        ("mo_ctrans_conv", (2, 2, 2, 2), [(32, 32, 16), (16, 16, 8), (8, 8, 4)]),
    ],
)
def test_intermediate_outputs_finest_first(name, strides, sizes):
    torch.manual_seed(0)
    net = build(name, strides, deep_supervision=True).eval()
    x = torch.randn(2, 1, 32, 32, 16)
    task = torch.tensor([0, 1])
    with torch.no_grad():
        outs = net(x, task=task, intermediates=True)
        plain = net(x, task=task)
    assert [tuple(o.shape[2:]) for o in outs] == sizes and all(o.shape[:2] == (2, 3) for o in outs)
    torch.testing.assert_close(outs[0], plain)  # the extra heads do not change the final output
    assert net.decoder_config()["deep_supervision"] is True
    net.train()
    loss = sum(o.square().mean() for o in net(x, task=task, intermediates=True))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.ds_heads.parameters())


def test_without_deep_supervision_nothing_changes():
    net = build()
    assert len(net.ds_heads) == 0 and "deep_supervision" not in net.decoder_config()
    with pytest.raises(ValueError, match="intermediates=True needs deep_supervision=True"):
        net(torch.randn(1, 1, 32, 32, 16), intermediates=True)


def test_loss_against_an_independent_computation():
    torch.manual_seed(0)
    base = MultiTalentLoss()
    outs = [torch.randn(2, 3, 8, 8, 4), torch.randn(2, 3, 4, 4, 2), torch.randn(2, 3, 2, 2, 1)]
    target = torch.randint(0, 4, (2, 1, 8, 8, 4))
    labelled = torch.tensor([[True, False, True], [True, True, False]])
    got = DeepSupervisionLoss(base).components(outs, target, labelled)
    # nearest-exact down-sampling by 2 and 4 keeps voxel 2i + 1 and 4i + 2 on each axis
    down2 = target[:, :, 1::2, 1::2, 1::2]
    down4 = target[:, :, 2::4, 2::4, 2::4]
    want = {
        k: 4 / 7 * base.components(outs[0], target, labelled)[k]
        + 2 / 7 * base.components(outs[1], down2, labelled)[k]
        + 1 / 7 * base.components(outs[2], down4, labelled)[k]
        for k in ("loss", "bce", "dice")
    }
    for k, v in want.items():
        torch.testing.assert_close(got[k], v)
    # a single tensor goes to the base loss unchanged
    torch.testing.assert_close(
        DeepSupervisionLoss(base)(outs[0], target, labelled), base(outs[0], target, labelled)
    )


def test_a_tiny_multitalent_run_with_deep_supervision(tiny_synth, tmp_path, capsys):
    from mosmos.cli import main as cli
    from mosmos.finetune.inference import load_model
    from tests.conftest import REPO
    from tests.test_finetune_e2e import tiny_finetune_overrides

    config = str(REPO / "configs/finetune/demo.yaml")
    run = tmp_path / "run"
    extra = {"train.strategy": "multitalent", "train.deep_supervision": "true", "train.epochs": 1}
    assert cli(["finetune", "--config", config, *tiny_finetune_overrides(tiny_synth, run, **extra)]) == 0
    model, spec = load_model(run)
    assert spec.decoder["deep_supervision"] is True and len(model.ds_heads) == 2
    bad = {**extra, "model.name": "mo_ctrans"}
    assert (
        cli(["finetune", "--config", config, *tiny_finetune_overrides(tiny_synth, tmp_path / "bad", **bad)])
        != 0
    )
    assert (
        "train.deep_supervision=true needs model.name in ['unet', 'mo_ctrans_conv']"
        in capsys.readouterr().err
    )
