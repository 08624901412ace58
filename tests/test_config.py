"""Typed configs: YAML + dotted overrides, and errors that name the key and list the valid ones."""

from __future__ import annotations

import pytest

from mosmos.config import dump_config, load_config
from mosmos.errors import ConfigError
from mosmos.pretrain.config import PretrainConfig


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, "data:\n  table: r.csv\ntrain:\n  epochs: 3\n")
    cfg = load_config(
        PretrainConfig, path, ["train.lr=0.01", "data.size=[32,32,16]", "model.encoder_kwargs={a: 1}"]
    )
    assert cfg.data.table == "r.csv" and cfg.train.epochs == 3
    assert cfg.train.lr == pytest.approx(0.01) and cfg.data.size == [32, 32, 16]
    assert cfg.model.encoder_kwargs == {"a": 1}
    again = load_config(PretrainConfig, _write(tmp_path, dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epochs=-1"], r"train\.epochs"),
        (["train.lr=-0.1"], r"train\.lr"),
        (["train.lr=fast"], "expected a number"),
        (["train.epochs=2.5"], "expected an integer"),
        (["train.lrate=1"], r"unknown key 'train\.lrate'.*valid keys: \[.*'lr'"),
        (["trian.lr=1"], "valid keys"),
        (["train.tag_loss=focal"], r"choose one of \['bce', 'asl'\]"),
        (["train.mixed_precision=fp8"], "choose one of"),
        (["data.spacing=[1,1]"], "data.spacing"),
        (["data.hu_window=[300,-200]"], "low < high"),
        (["train.contrastive_weight=0", "train.tag_weight=0"], "not both 0"),
        (["noequals"], "key=value"),
    ],
)
def test_bad_values_fail_before_work(tmp_path, overrides, message):
    path = _write(tmp_path, "data:\n  table: r.csv\n")
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, path, overrides)


def test_unknown_yaml_key_and_missing_table(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(PretrainConfig, _write(tmp_path, "data:\n  table: r.csv\n  tabel: x\n"))
    with pytest.raises(ConfigError, match=r"data\.table is required"):
        load_config(PretrainConfig, _write(tmp_path, "seed: 1\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")


# the settings each stage needs from its user (the shipped default configs leave it empty)
_REQUIRED = {
    "pretrain": ["data.table=r.csv"],
    "finetune": ["data.datasets=[d]"],
    "benchmark": ["data.target=d", "data.test=t"],
}


@pytest.mark.parametrize("stage", sorted(_REQUIRED))
def test_every_shipped_config_loads(stage):
    from pathlib import Path

    from mosmos.benchmark.config import BenchmarkConfig
    from mosmos.finetune.config import FinetuneConfig

    schema = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "benchmark": BenchmarkConfig}[stage]
    paths = sorted((Path(__file__).resolve().parent.parent / "configs" / stage).glob("*.yaml"))
    assert {p.name for p in paths} >= {"default.yaml", "demo.yaml"}
    for path in paths:
        cfg = load_config(schema, path, _REQUIRED[stage])
        assert cfg.output_dir, path
        if path.name == "default.yaml":  # the demo configs name the generated data themselves
            with pytest.raises(ConfigError, match="is required"):
                load_config(schema, path)


@pytest.mark.parametrize(
    "key, reason",
    [
        ("model.attention_values=patch", "removed.*finest encoder level"),
        ("model.attention_residual_average=true", "removed.*CSRA"),
        ("model.attention_init_sharpness=4", "removed.*starts flat"),
        ("model.attention_prior_gain=30", "removed.*fixed at 10"),
        ("model.attention_fuse_levels=false", "removed.*always fused"),
        ("model.tag_dim=64", "moved to model.tag_head.dim"),
        ("model.attention_position_prior=[8,8,4]", r"moved to model.tag_head.position_prior \(default now"),
    ],
)
def test_retired_keys_say_what_became_of_them(tmp_path, key, reason):
    """A stage 1 key of an earlier version fails with its fate, as an override and in a YAML file."""
    with pytest.raises(ConfigError, match=f"{key.split('=')[0]}: {reason}"):
        load_config(PretrainConfig, None, ["data.table=r.csv", key])
    name, value = key.removeprefix("model.").split("=")
    with pytest.raises(ConfigError, match=f"model.{name}: {reason}"):
        load_config(PretrainConfig, _write(tmp_path, f"data: {{table: r.csv}}\nmodel: {{{name}: {value}}}\n"))


def test_tag_head_settings_are_one_section(tmp_path):
    """model.tag_head is one nested section: overrides reach its fields, the dump round-trips, and a
    bad setting is named with its full key."""
    overrides = ["data.table=r.csv", "model.tag_head.dim=16", "model.tag_head.margin=0"]
    cfg = load_config(PretrainConfig, None, overrides)
    assert (cfg.model.tag_head.dim, cfg.model.tag_head.margin, cfg.model.tag_head.min_inside) == (16, 0, 1.0)
    assert load_config(PretrainConfig, _write(tmp_path, dump_config(cfg))) == cfg
    with pytest.raises(ConfigError, match=r"model.tag_head.min_inside=1.5 must be in \[0, 1\]"):
        load_config(PretrainConfig, None, ["data.table=r.csv", "model.tag_head.min_inside=1.5"])
