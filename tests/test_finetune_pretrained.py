"""Stage 1 -> stage 2 transfer: building segmenters around an encoder export, the load report, shape
mismatches and the MOSMOS attention head (reading the export itself: tests/test_export.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mosmos.errors import ConfigError
from mosmos.export import Preprocessing, write_encoder_export
from mosmos.finetune.pretrained import LoadReport, build_segmenter
from mosmos.models import ResCNNEncoder, TagAttentionHead, TagHeadConfig, ViTEncoder, create_image_encoder

torch.set_num_threads(2)

ENCODER_KWARGS = {"channels": [8, 16, 16, 24], "strides": [2, 2, 2, 2], "num_res_units": 1, "norm": "batch"}
DECODER = {"unet": None, "mo_ctrans": None, "unetr": {"feature_size": 8}}


def write_export(run: Path, with_head: bool = True, seed: int = 123) -> dict[str, torch.Tensor]:
    """A tiny stage 1 export; returns the tensors it must hold, named as the export names them."""
    torch.manual_seed(seed)
    encoder = create_image_encoder("rescnn3d", **ENCODER_KWARGS)
    # non-trivial BatchNorm statistics, so that buffers are checked too
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    head = TagAttentionHead(encoder.feature_channels, 3, TagHeadConfig(dim=8, level=1), spatial_dims=3)
    tensors = {f"encoder.{k}": v.clone() for k, v in encoder.state_dict().items()}
    if with_head:
        tensors.update({f"tag_attention.{k}": v.clone() for k, v in head.state_dict().items()})
    write_encoder_export(
        run,
        "rescnn3d",
        encoder,
        Preprocessing([10.0, 10.0, 14.0], [32, 32, 16], [-200.0, 300.0], -500.0),
        tag_head=head if with_head else None,
        organs=["liver", "spleen", "kidney"] if with_head else [],
        objective={"contrastive_weight": 1.0, "tag_weight": 1.0},
    )
    return tensors


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    run = tmp_path_factory.mktemp("stage1")
    return run, write_export(run)


@pytest.mark.parametrize("name", ["unet", "mo_ctrans", "unetr"])
def test_same_stage1_encoder_loads_into_each_network(name, export):
    run, tensors = export
    torch.manual_seed(0)  # another seed than the export: loading must change the weights
    model, report = build_segmenter(name, num_classes=3, num_tasks=2, init=run, decoder_kwargs=DECODER[name])
    assert isinstance(model.encoder, ResCNNEncoder)  # unetr too: the architecture comes from encoder.json
    assert isinstance(report, LoadReport) and report.source == run / "encoder.safetensors"
    encoder_keys = sorted(k for k in tensors if k.startswith("encoder."))
    head_keys = sorted(k for k in tensors if k.startswith("tag_attention."))
    assert sorted(report.loaded) == encoder_keys and len(encoder_keys) == len(model.encoder.state_dict())
    assert report.missing == []
    assert sorted(report.skipped) == head_keys and head_keys  # maps off: the head is not used
    state = model.encoder.state_dict()
    for key in encoder_keys:
        assert torch.equal(state[key.removeprefix("encoder.")], tensors[key]), key
    assert model.attention_head is None
    y = model(torch.randn(1, 1, 32, 32, 16), task=torch.tensor([1]))
    assert y.shape == (1, 3, 32, 32, 16)
    text = report.format(max_keys=2)
    assert f"{len(encoder_keys)} loaded, 0 missing, {len(head_keys)} skipped" in text
    assert "(+" in text and encoder_keys[0] in text


def test_weights_differ_without_loading(export):
    _, tensors = export
    torch.manual_seed(0)
    model, _ = build_segmenter("unet", num_classes=3, num_tasks=1, encoder_kwargs=ENCODER_KWARGS)
    key = "encoder.stages.0.0.conv.weight"
    assert not torch.equal(model.encoder.state_dict()[key.removeprefix("encoder.")], tensors[key])


@pytest.mark.parametrize("name", ["unet", "mo_ctrans", "unetr"])
def test_attention_maps_head_is_loaded(name, export):
    run, tensors = export
    model, report = build_segmenter(
        name, num_classes=3, num_tasks=2, init=run, use_attention_maps=True, decoder_kwargs=DECODER[name]
    )
    assert isinstance(model.attention_head, TagAttentionHead)
    assert report.skipped == [] and report.missing == []
    assert sorted(report.loaded) == sorted(tensors)
    head_state = model.attention_head.state_dict()
    for key in (k for k in tensors if k.startswith("tag_attention.")):
        assert torch.equal(head_state[key.removeprefix("tag_attention.")], tensors[key]), key
    model.eval()
    x, task = torch.randn(1, 1, 32, 32, 16), torch.tensor([0])
    with torch.no_grad():
        y = model(x, task)
        model.attention_head.pixel_tag.queries.mul_(-1.0)  # other attention maps -> other logits
        assert (model(x, task) - y).abs().max() > 1e-5
    assert y.shape == (1, 3, 32, 32, 16)


def test_attention_maps_need_a_stage1_head(tmp_path):
    with pytest.raises(ConfigError, match="init='random'"):
        build_segmenter("unet", 3, 1, init="random", use_attention_maps=True)
    run = tmp_path / "no_head"
    write_export(run, with_head=False)
    with pytest.raises(ConfigError, match="no tag_attention head"):
        build_segmenter("unet", 3, 1, init=run, use_attention_maps=True)
    model, report = build_segmenter("unet", 3, 1, init=run)  # fine without maps
    assert report.skipped == [] and len(report.loaded) == len(model.encoder.state_dict())


def test_shape_mismatch_names_every_key(export):
    run, _ = export
    wrong = {**ENCODER_KWARGS, "channels": [8, 16, 16, 32]}
    with pytest.raises(ConfigError) as err:
        build_segmenter("unet", 3, 1, init=run, encoder_kwargs=wrong)
    message = str(err.value)
    assert (
        "encoder.stages.3.0.conv.weight: checkpoint [24, 16, 3, 3, 3] vs model [32, 16, 3, 3, 3]" in message
    )
    assert "encoder.stages.0.0.conv.weight" not in message  # only the mismatched keys are listed
    assert "encoder.json" in message


def test_random_init_defaults_and_errors():
    model, report = build_segmenter("unet", 3, 1, encoder_kwargs=ENCODER_KWARGS)
    assert report is None and isinstance(model.encoder, ResCNNEncoder)
    vit = {"hidden_size": 16, "mlp_dim": 32, "num_layers": 4, "num_heads": 2}
    model, _ = build_segmenter(
        "unetr", 2, 1, encoder_kwargs=vit, img_size=(32, 32, 16), decoder_kwargs={"feature_size": 8}
    )
    assert isinstance(model.encoder, ViTEncoder) and model.encoder.img_size == (32, 32, 16)
    assert model(torch.randn(1, 1, 32, 32, 16)).shape == (1, 2, 32, 32, 16)
    with pytest.raises(ConfigError, match="unknown segmenter"):
        build_segmenter("vnet", 2, 1)
    with pytest.raises(ConfigError, match="rescnn3d"):
        build_segmenter("unet", 2, 1, encoder_kwargs={"channels": [8], "strides": [2, 2]})
