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

    from mosmos.benchmark.grid import BenchmarkConfig
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
