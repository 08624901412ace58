"""``train.log_with``: accelerate's trackers, checked when the config loads."""

from __future__ import annotations

import importlib.util

import pytest

from mosmos.config import load_config
from mosmos.errors import ConfigError
from mosmos.finetune.config import FinetuneConfig

BASE = ["data.datasets=[x]"]


def test_log_with_takes_the_named_trackers_only():
    assert load_config(FinetuneConfig, None, BASE).train.log_with == "tensorboard"
    assert load_config(FinetuneConfig, None, [*BASE, "train.log_with=none"]).train.log_with == "none"
    with pytest.raises(ConfigError, match=r"train\.log_with"):
        load_config(FinetuneConfig, None, [*BASE, "train.log_with=comet"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_tracker_that_is_not_installed_is_named():
    with pytest.raises(ConfigError, match=r"the wandb package is not installed \(pip install wandb\)"):
        load_config(FinetuneConfig, None, [*BASE, "train.log_with=wandb"])


def test_none_starts_no_tracker(tmp_path):
    from mosmos.engine.accelerator import make_accelerator

    train = load_config(FinetuneConfig, None, [*BASE, "train.log_with=none"]).train
    assert make_accelerator(train, tmp_path).log_with == []
