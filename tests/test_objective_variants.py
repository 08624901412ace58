"""The stage 1 objective: the paper's by default, departures only as named variants, recorded."""

from __future__ import annotations

import pytest

from mosmos.config import dump_config, load_config
from mosmos.errors import ConfigError
from mosmos.pretrain.config import OBJECTIVE_VARIANTS, PAPER_OBJECTIVE, PretrainConfig, objective_name
from mosmos.pretrain.train import stage1_objective
from tests.conftest import REPO


def _settings(cfg: PretrainConfig, keys) -> dict:
    return {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in keys}


def test_defaults_are_the_papers_objective():
    cfg = load_config(PretrainConfig, None, ["data.table=x.csv"])
    assert cfg.train.variants == []
    assert _settings(cfg, PAPER_OBJECTIVE) == PAPER_OBJECTIVE
    # both terms train the image encoder
    assert (
        cfg.train.contrastive_weight > 0 and cfg.train.tag_weight > 0 and cfg.train.image_embedding_grad == 1
    )
    assert stage1_objective(cfg)["name"] == "mosmos"


def test_shipped_default_config_is_the_papers_objective():
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/default.yaml", ["data.table=x.csv"])
    assert _settings(cfg, PAPER_OBJECTIVE) == PAPER_OBJECTIVE and cfg.train.variants == []


@pytest.mark.parametrize("name", sorted(OBJECTIVE_VARIANTS))
def test_each_variant_sets_exactly_its_keys(name):
    cfg = load_config(PretrainConfig, None, ["data.table=x.csv", f"train.variants=[{name}]"])
    changed = OBJECTIVE_VARIANTS[name].settings
    assert _settings(cfg, changed) == changed
    untouched = {k: v for k, v in PAPER_OBJECTIVE.items() if k not in changed}
    assert _settings(cfg, untouched) == untouched
    record = stage1_objective(cfg)
    assert record["name"] == f"mosmos+{name}" and record["variants"] == [name]


def test_demo_recipe_is_named_and_resolved_config_reloads(tmp_path):
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/demo.yaml")
    assert objective_name(cfg.train.variants) == "mosmos+embedding_tags+lit+pooled_tags+tags_in_embedding"
    assert cfg.train.image_embedding_grad == 0 and cfg.model.embedding_from_tags
    assert (cfg.train.pooled_tag_weight, cfg.train.embedding_tag_weight) == (1.0, 0.5)
    # the run directory's resolved config (variants and the values they set) loads back unchanged
    resolved = tmp_path / "config.yaml"
    resolved.write_text(dump_config(cfg))
    assert load_config(PretrainConfig, resolved) == cfg


def test_conflicting_and_unknown_variants_are_refused():
    with pytest.raises(ConfigError, match=r"unknown objective variant 'lit2'.*lit"):
        load_config(PretrainConfig, None, ["data.table=x.csv", "train.variants=[lit2]"])
    with pytest.raises(ConfigError, match=r"'lit'.*image_embedding_grad=0.0.*image_embedding_grad=0.5"):
        load_config(
            PretrainConfig,
            None,
            ["data.table=x.csv", "train.variants=[lit]", "train.image_embedding_grad=0.5"],
        )
    # the variant's own value (a resolved config read back) is not a conflict
    cfg = load_config(
        PretrainConfig, None, ["data.table=x.csv", "train.variants=[lit]", "train.image_embedding_grad=0"]
    )
    assert cfg.train.image_embedding_grad == 0 and cfg.train.text_lr_scale == 0.1
