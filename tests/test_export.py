"""The stage 1 -> stage 2 export: stage 1's writer, ``mosmos.load_encoder``, and clear errors on bad exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mosmos
from mosmos.errors import ConfigError
from mosmos.export import EXPORT_FORMAT, Preprocessing, read_encoder_export, source_commit
from mosmos.models import (
    MosmosPretrainModel,
    TagHeadConfig,
    TextEncoder,
    build_small_bert,
    create_image_encoder,
)
from mosmos.pretrain.config import PretrainConfig
from mosmos.pretrain.train import export
from tests.conftest import REPO

torch.set_num_threads(2)

ORGANS = ["liver", "spleen", "kidney_left", "kidney_right"]
ENCODER_KWARGS = {"channels": [4, 8, 8, 16], "strides": [1, 2, 2, 2], "num_res_units": 1, "norm": "batch"}
TINY_BERT = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}
#: Non-default values of every objective setting, so that a setting recorded from the wrong place shows.
OBJECTIVE = {
    "train.contrastive_weight": 0.5,
    "train.tag_weight": 2.0,
    "train.embedding_tag_weight": 0.25,
    "train.pooled_tag_weight": 0.75,
    "train.image_embedding_grad": 0.5,
    "train.text_lr_scale": 0.1,
    "train.tag_loss": "asl",
    "train.class_balance": False,
    "train.queue_size": 16,
    "data.shuffle_reports": True,
}


def _config(out: Path) -> PretrainConfig:
    cfg = PretrainConfig(output_dir=str(out))
    cfg.model.encoder_kwargs = dict(ENCODER_KWARGS)
    cfg.data.spacing, cfg.data.size, cfg.data.hu_window = [2.0, 2.0, 4.0], [16, 16, 16], [-150.0, 250.0]
    for dotted, value in OBJECTIVE.items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, value)
    return cfg


def _model(seed: int) -> MosmosPretrainModel:
    torch.manual_seed(seed)
    encoder = create_image_encoder("rescnn3d", **ENCODER_KWARGS)
    for m in encoder.modules():  # non-trivial BatchNorm statistics: buffers must travel too
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    text = TextEncoder(build_small_bert(50, **TINY_BERT), pooling="mean")
    model = MosmosPretrainModel(
        encoder, text, embed_dim=8, num_tags=len(ORGANS), tag_head_config=TagHeadConfig(dim=8)
    )
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    return model.eval()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> tuple[Path, MosmosPretrainModel, PretrainConfig]:
    """A tiny stage 1 model, exported by stage 1's own export step."""
    out = tmp_path_factory.mktemp("stage1")
    cfg, model = _config(out), _model(seed=7)
    task = SimpleNamespace(cfg=cfg, vocab=SimpleNamespace(names=ORGANS))
    export(task, SimpleNamespace(model=model), out)
    return out, model, cfg


def test_load_encoder_gives_the_exported_modules_numerically(stage1):
    out, model, _ = stage1
    loaded = mosmos.load_encoder(out)
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model.image_encoder(x), loaded.encoder(x)
        # same weights, same kernels, same process: the results are bit-identical
        for a, b in zip(want["features"], got["features"], strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(got["pooled"], want["pooled"], rtol=0, atol=0)
        for a, b in zip(model.tag_head(want["features"]), loaded.tag_head(got["features"]), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        pooled = want["pooled"]
        torch.testing.assert_close(
            loaded.projections["image"](pooled), model.image_proj(pooled), rtol=0, atol=0
        )
        h = torch.randn(3, 16)
        torch.testing.assert_close(loaded.projections["text"](h), model.text_proj(h), rtol=0, atol=0)
        # and an encoder with other weights does differ: the comparison above can fail
        other = _model(seed=8).image_encoder(x)["pooled"]
        assert (other - want["pooled"]).abs().max() > 1e-3 * want["pooled"].abs().max()
    assert not loaded.encoder.training and not loaded.tag_head.training
    assert loaded.export.organs == ORGANS
    assert loaded.export.temperature == pytest.approx(float(torch.exp(torch.tensor(-2.5))), rel=1e-6)


def test_the_export_records_the_config_objective_preprocessing_and_commit(stage1):
    out, _, cfg = stage1
    meta, _ = read_encoder_export(out)
    for dotted, value in OBJECTIVE.items():  # every loss weight and gradient setting, as configured
        section, key = dotted.split(".")
        assert meta.objective[key] == getattr(getattr(cfg, section), key) == value, dotted
    assert meta.objective["freeze_text"] is False and meta.objective["embedding_from_tags"] is False
    assert not {"lr", "epochs", "batch_size"} & set(meta.objective)  # engine settings are not objective
    assert meta.preprocess == Preprocessing([2.0, 2.0, 4.0], [16, 16, 16], [-150.0, 250.0], -500.0)
    pre = meta.preprocess.to_config()
    assert (pre.spacing, pre.size, pre.hu_window) == ((2.0, 2.0, 4.0), (16, 16, 16), (-150.0, 250.0))
    assert meta.architecture == "rescnn3d" and meta.format == EXPORT_FORMAT
    assert meta.text == {
        "name": "small-bert",
        "pooling": "mean",
        "kwargs": {},
        "max_length": 256,
        "dir": "text",
    }
    assert (out / "text" / "config.json").is_file()  # the text tower is saved where the record says
    assert meta.projections == {"image": {"in_dim": 16, "out_dim": 8}, "text": {"in_dim": 16, "out_dim": 8}}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout records its commit, marked when the tree has changes
        assert meta.commit.removesuffix("-dirty") == head.stdout.strip()
    else:
        assert meta.commit == f"mosmos {mosmos.__version__}"
    assert source_commit() == meta.commit


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("encoder.json", "encoder.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit_json(run: Path, edit) -> None:
    data = json.loads((run / "encoder.json").read_text())
    edit(data)
    (run / "encoder.json").write_text(json.dumps(data))


def test_bad_exports_name_the_file_and_the_problem(stage1, tmp_path):
    out, _, _ = stage1
    with pytest.raises(ConfigError, match="does not exist"):
        read_encoder_export(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"missing encoder\.json"):
        read_encoder_export(tmp_path / "empty")
    run = _copy(out, tmp_path / "bad_json")
    (run / "encoder.json").write_text('{"format": ')
    with pytest.raises(ConfigError, match=f"cannot read {run / 'encoder.json'}"):
        read_encoder_export(run)
    run = _copy(out, tmp_path / "format")
    _edit_json(run, lambda d: d.update(format="mosmos-encoder-v9"))
    with pytest.raises(ConfigError, match=f"{run / 'encoder.json'}: format is 'mosmos-encoder-v9'"):
        read_encoder_export(run / "encoder.safetensors")
    run = _copy(out, tmp_path / "keys")
    _edit_json(run, lambda d: (d.pop("objective"), d.update(colour="red")))
    with pytest.raises(ConfigError, match=r"missing keys \['objective'\]; unknown keys \['colour'\]"):
        read_encoder_export(run)
    run = _copy(out, tmp_path / "no_head_weights")
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / "encoder.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith("tag_attention.")}, run / "encoder.safetensors"
    )
    with pytest.raises(ConfigError, match=r"encoder\.safetensors: .*no tag_attention\.\* tensors"):
        read_encoder_export(run)
    run = _copy(out, tmp_path / "shapes")
    _edit_json(run, lambda d: d["encoder_kwargs"].update(channels=[4, 8, 8, 32]))
    with pytest.raises(
        ConfigError, match=r"stages\.3\.0\.conv\.weight: file \[16, 8, 3, 3, 3\] vs model \[32"
    ):
        mosmos.load_encoder(run)


def test_exports_of_the_previous_format_still_load(stage1, tmp_path):
    out, model, _ = stage1
    run = _copy(out, tmp_path / "v1")
    v1_keys = (
        "architecture",
        "encoder_kwargs",
        "feature_channels",
        "feature_strides",
        "preprocess",
        "organs",
    )
    _edit_json(
        run,
        lambda d: [d.pop(k) for k in list(d) if k not in v1_keys] + [d.update(format="mosmos-encoder-v1")],
    )
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / "encoder.safetensors")
    save_file({k: v for k, v in tensors.items() if k.startswith("encoder.")}, run / "encoder.safetensors")
    loaded = mosmos.load_encoder(run)
    assert loaded.tag_head is None and loaded.projections == {} and loaded.export.commit == ""
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encoder(x)["pooled"], model.image_encoder(x)["pooled"], rtol=0, atol=0
        )


def test_the_writer_checks_its_inputs_first(tmp_path):
    model = _model(seed=1)
    pre = Preprocessing([1.0, 1.0, 1.0], [16, 16, 16], [-100.0, 100.0], -500.0)
    from mosmos.export import write_encoder_export

    with pytest.raises(ValueError, match="4 tags but 2 organs"):
        write_encoder_export(
            tmp_path, "rescnn3d", model.image_encoder, pre, tag_head=model.tag_head, organs=["a", "b"]
        )
    with pytest.raises(ValueError, match="unknown side"):
        write_encoder_export(
            tmp_path, "rescnn3d", model.image_encoder, pre, projections={"audio": model.image_proj}
        )
    with pytest.raises(ValueError, match="hu_window"):
        Preprocessing([1.0, 1.0, 1.0], [16, 16, 16], [100.0, -100.0], -500.0)
    assert not list(tmp_path.iterdir())  # nothing written


def test_import_mosmos_stays_light():
    code = "import sys, mosmos; assert 'torch' not in sys.modules; mosmos.load_encoder; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
