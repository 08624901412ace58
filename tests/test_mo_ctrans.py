"""MO-CTranS as the paper builds it (models/segmentation/mo_ctrans.py): skips folded onto the
bottleneck's grid, one task token appended at the bottleneck and carried through every stage,
global attention over the grid, the token dropped before the shared head; old run directories of
the convolutional variant still load."""

from __future__ import annotations

import pytest
import torch

from mosmos.finetune.inference import ModelSpec, legacy_spec
from mosmos.models import create_image_encoder, create_model
from mosmos.models.segmentation import MOCTransSegmenter
from mosmos.models.segmentation.mo_ctrans import default_voxel_channels, depth_to_space, space_to_depth

torch.set_num_threads(1)


def build(sd=3, strides=(2, 2, 2, 2), num_tasks=3, **kwargs) -> MOCTransSegmenter:
    encoder = create_image_encoder(
        f"rescnn{sd}d", channels=(8, 16, 16, 24), strides=strides, num_res_units=1, norm="batch"
    )
    return create_model(
        "segmenter", "mo_ctrans", encoder=encoder, num_classes=3, num_tasks=num_tasks, **kwargs
    )


def test_space_to_depth_by_hand_and_its_inverse():
    x = torch.arange(2 * 3 * 4 * 6 * 2, dtype=torch.float32).reshape(2, 3, 4, 6, 2)
    tokens = space_to_depth(x, 2)
    assert tokens.shape == (2, 2 * 3 * 1, 3 * 8)
    # token (i, j, k) of the 2 x 3 x 1 grid holds the 2 x 2 x 2 block at (2i, 2j, 2k): channel
    # first, then the block's voxels in row-major order
    i, j = 1, 2
    block = x[1, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 0:2].reshape(3, 8)
    torch.testing.assert_close(tokens[1, i * 3 + j].reshape(3, 8), block)
    assert torch.equal(depth_to_space(tokens, (2, 3, 1), 2), x)
    x2 = torch.randn(1, 5, 8, 4)
    assert torch.equal(depth_to_space(space_to_depth(x2, 4), (2, 1), 4), x2)


def test_token_widths_double_and_voxel_channels_follow_the_paper_in_2d():
    # 2D, folds 1, 2, 4, 8: voxel channels halve per level as in the authors' network (C_i / c0)
    assert default_voxel_channels(64, [1, 2, 4, 8], 2) == [64, 32, 16, 8]
    # 3D: a quarter per level, at least 2
    assert default_voxel_channels(64, [1, 2, 4, 8], 3) == [64, 16, 4, 2]
    net = build(3)
    assert net.folds == [1, 2, 4, 8]
    assert net.token_channels == [c * f**3 for c, f in zip(net.voxel_channels, net.folds, strict=True)]


@pytest.mark.parametrize("sd", [3, 2])
def test_task_token_joins_once_and_reaches_every_stage(sd):
    torch.manual_seed(0)
    net = build(sd).eval()
    x = torch.randn(1, 1, *((32, 32, 16) if sd == 3 else (32, 32)))
    grid = [s // 16 for s in x.shape[2:]]
    n_cells = int(torch.tensor(grid).prod())
    seen: dict[str, list] = {"stage_in": [], "stage_out": [], "token_calls": []}

    def record(module, inputs, output) -> None:  # a forward hook returning None keeps the output
        seen["stage_in"].append(inputs[0])
        seen["stage_out"].append(output)

    hooks = [net.task_token.register_forward_hook(lambda m, i, o: seen["token_calls"].append(o) and None)]
    hooks += [stage.register_forward_hook(record) for stage in net.stages]
    outs = []
    with torch.no_grad():
        for task in (0, 1):
            outs.append(net(x, task=torch.tensor([task])))
    for h in hooks:
        h.remove()
    levels = len(net.stages)
    assert len(seen["token_calls"]) == 2  # the embedding is read once per forward, at the bottleneck
    stage_in = [seen["stage_in"][:levels], seen["stage_in"][levels:]]
    stage_out = [seen["stage_out"][:levels], seen["stage_out"][levels:]]
    for k in range(levels):
        # every stage sees the grid's cells and one more token: the task token, carried along
        assert stage_in[0][k].shape == (1, n_cells + 1, net.token_channels[k])
        # ... and every stage's grid tokens depend on the task
        assert (stage_out[0][k][:, :-1] - stage_out[1][k][:, :-1]).abs().max() > 1e-4
    # at the bottleneck the appended token is the task embedding itself (last position)
    torch.testing.assert_close(stage_in[0][0][0, -1], net.task_token.weight[0])
    torch.testing.assert_close(stage_in[1][0][0, -1], net.task_token.weight[1])
    # the grid tokens entering stage 0 do not depend on the task; the output does
    torch.testing.assert_close(stage_in[0][0][:, :-1], stage_in[1][0][:, :-1])
    assert (outs[0] - outs[1]).abs().max() > 1e-4


@pytest.mark.parametrize("strides", [(2, 2, 2, 2), (1, 2, 2, 2)])
def test_the_token_is_dropped_before_the_shared_head(strides):
    """The head's input is the unfolded grid (no token position), equal to the decoder's last
    sequence without its last token, depth-to-space; there is one head for every task."""
    torch.manual_seed(0)
    net = build(3, strides=strides).eval()
    x = torch.randn(2, 1, 32, 32, 16)
    task = torch.tensor([2, 0])
    captured = {}
    first = net.stem_stage if net.has_stem else net.out
    hook = first.register_forward_pre_hook(lambda m, i: captured.__setitem__("y", i[0]))
    with torch.no_grad():
        logits = net(x, task=task)
        features, maps = net.encode(x)
        seq = net.decode_tokens(features, maps, task)
    hook.remove()
    grid = features[-1].shape[2:]
    finest = [g * net.folds[-1] for g in grid]
    assert finest == [s // strides[0] for s in x.shape[2:]]
    assert captured["y"].shape == (2, net.voxel_channels[-1], *finest)
    torch.testing.assert_close(captured["y"], depth_to_space(seq[:, :-1], grid, net.folds[-1]))
    assert logits.shape == (2, 3, 32, 32, 16)
    assert net.has_stem == (strides[0] > 1)
    assert not any(n.startswith("out.") and "task" in n for n, _ in net.named_parameters())


def test_attention_is_global_over_the_grid():
    """A change in one corner of the input reaches every grid token at the bottleneck stage (no
    windows), through attention and not the encoder's receptive field alone."""
    torch.manual_seed(0)
    net = build(3).eval()
    x = torch.randn(1, 1, 64, 64, 32)  # grid 4 x 4 x 2
    features = net.encoder.forward_features(x)
    changed = [f.clone() for f in features]
    changed[-1][:, :, 0, 0, 0] += 5.0  # one bottleneck cell
    task = torch.tensor([1])
    captured = []
    hook = net.stages[0].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        net.decode_tokens(features, None, task)
        net.decode_tokens(changed, None, task)
    hook.remove()
    diff = (captured[0] - captured[1]).abs().amax(dim=2)[0]
    assert (diff > 1e-6).all()  # every cell of the 32-cell grid and the task token moved


def test_gradients_reach_the_task_embedding_rows_in_the_batch_only():
    torch.manual_seed(0)
    net = build(3, num_tasks=3)
    x = torch.randn(2, 1, 32, 32, 16)
    y = net(x, task=torch.tensor([0, 2]))
    (y * torch.randn_like(y)).sum().backward()
    grad = net.task_token.weight.grad.abs().sum(dim=1)
    assert grad[0] > 0 and grad[2] > 0 and grad[1] == 0
    assert all(p.grad is not None for p in net.widen.parameters())


def test_checks_name_the_bad_value():
    with pytest.raises(ValueError, match=r"voxel_channels=\[4, 4\] must hold 4"):
        build(3, voxel_channels=[4, 4])
    with pytest.raises(ValueError, match=r"dropout=1\.5"):
        build(3, dropout=1.5)
    with pytest.raises(ValueError, match="head_dim=0"):
        build(3, head_dim=0)


def test_old_run_directories_load_as_the_conv_variant():
    """A model.json that says mo_ctrans next to weights with a task token per stage (written
    before the faithful decoder took the name) rebuilds as mo_ctrans_conv; new ones stay."""
    spec = ModelSpec(
        name="mo_ctrans",
        encoder="rescnn3d",
        encoder_kwargs={},
        decoder={},
        attention_head=None,
        organs=["liver"],
        tasks=[{"name": "a", "organs": ["liver"]}],
        organ_task={"liver": 0},
        strategy="masked",
        preprocess={},
        extra={},
    )
    old = {"transformers.0.task_token.weight": torch.zeros(1), "out.conv.conv.weight": torch.zeros(1)}
    new = {"task_token.weight": torch.zeros(1), "stages.0.0.attn.qkv.weight": torch.zeros(1)}
    assert legacy_spec(spec, old).name == "mo_ctrans_conv"
    assert legacy_spec(spec, new).name == "mo_ctrans"
    ensemble = ModelSpec(**{**spec.__dict__, "name": "ensemble", "decoder": {"member": "mo_ctrans"}})
    assert (
        legacy_spec(ensemble, {f"members.0.{k}": v for k, v in old.items()}).decoder["member"]
        == "mo_ctrans_conv"
    )
    assert (
        legacy_spec(ensemble, {f"members.0.{k}": v for k, v in new.items()}).decoder["member"] == "mo_ctrans"
    )


def test_a_tiny_finetuning_run_with_mo_ctrans(tiny_synth, tmp_path):
    """``model.name=mo_ctrans`` trains end to end on the generated datasets (one task token per
    dataset), and the run directory rebuilds as the faithful network."""
    from mosmos.cli import main as cli
    from mosmos.finetune.inference import load_model
    from tests.conftest import REPO
    from tests.test_finetune_e2e import tiny_finetune_overrides

    run = tmp_path / "run"
    overrides = tiny_finetune_overrides(tiny_synth, run, **{"model.name": "mo_ctrans", "train.epochs": 1})
    assert cli(["finetune", "--config", str(REPO / "configs/finetune/demo.yaml"), *overrides]) == 0
    model, spec = load_model(run)
    assert spec.name == "mo_ctrans" and isinstance(model, MOCTransSegmenter)
    assert model.num_tasks == len(spec.tasks) == 3 and "voxel_channels" in spec.decoder
