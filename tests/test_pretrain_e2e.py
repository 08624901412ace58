"""Stage 1 end to end on tiny phantoms: outputs, a local HF text encoder, kill-and-resume equality."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from mosmos.config import load_config
from mosmos.errors import ConfigError
from mosmos.pretrain.config import PretrainConfig
from mosmos.pretrain.train import run
from tests.conftest import REPO, tiny_pretrain_overrides

DEMO = REPO / "configs" / "pretrain" / "demo.yaml"


def _cfg(data, run_dir, **extra):
    return load_config(PretrainConfig, DEMO, tiny_pretrain_overrides(data, run_dir, **extra))


def test_pretrain_writes_encoder_metrics_and_overlays(tiny_synth, tmp_path):
    final = run(_cfg(tiny_synth, tmp_path / "run", **{"eval.train_cases": 5}))
    out = tmp_path / "run"
    for name in ("encoder.safetensors", "encoder.json", "metrics.json", "config.yaml", "versions.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["architecture"] == "rescnn3d" and len(meta["organs"]) == 11
    assert meta["preprocess"]["spacing"] == [10.0, 10.0, 14.0]
    weights = load_file(out / "encoder.safetensors")
    assert any(k.startswith("encoder.") for k in weights) and any(
        k.startswith("tag_attention.") for k in weights
    )
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 3  # one evaluation per epoch
    for key in (
        "i2t_R@1",
        "t2i_R@5",
        "tag_mAP",
        "tag_AUROC",
        "pointing_game",
        "pointing_game_tolerant",
        "attention_peak_distance_mm",
        "attention_border_fraction",
    ):
        assert key in final, key
    # the synthetic ground truth's findings are scored one by one (those the tiny val split shows)
    scored = [k for k in final if k.startswith("finding_AUROC/")]
    assert scored and all(0.0 <= final[k] <= 1.0 for k in scored)
    assert list((out / "attention").glob("*.png"))
    assert (out / "text" / "tokenizer.json").is_file()
    # eval.train_cases: five training pairs scored like the validation split (no labels: no pointing)
    assert final["train/retrieval_chance_R@1"] == 1 / 5
    assert final["retrieval_chance_R@1"] != 1 / 5
    assert 0.0 <= final["train/tag_mAP"] <= 1.0 and 0.0 <= final["train/i2t_R@1"] <= 1.0
    assert not any(k.startswith("train/pointing") for k in final)
    assert all("train/tag_mAP" in h for h in history)


def test_train_cases_must_be_a_count(tiny_synth, tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.train_cases"):
        _cfg(tiny_synth, tmp_path / "run", **{"eval.train_cases": -1})


def test_local_huggingface_text_encoder(tiny_synth, tmp_path):
    from transformers import BertConfig, BertModel

    from mosmos.pretrain.text import train_wordpiece_tokenizer

    hf_dir = tmp_path / "tiny-bert"
    tok = train_wordpiece_tokenizer(["the liver is normal", "no focal hepatic lesion"] * 5, vocab_size=120)
    tok.save_pretrained(hf_dir)
    BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=48,
        )
    ).save_pretrained(hf_dir)
    final = run(_cfg(tiny_synth, tmp_path / "run", **{"model.text_encoder": str(hf_dir), "train.epochs": 1}))
    assert "i2t_R@1" in final


def test_two_process_launch_forms_one_group(tiny_synth, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m mosmos.pretrain` on CPU: one gloo group, half the steps."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29561",
        "-m",
        "mosmos.pretrain",
        "--config",
        str(DEMO),
        *tiny_pretrain_overrides(tiny_synth, out, **{"train.epochs": 2}),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert (ckpt / "random_states_1.pkl").is_file()  # both ranks saved their state
    # 18 training cases, 4 per process and step: 2 steps per epoch with 2 processes (4 with one)
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 4
    assert "i2t_R@1" in json.loads((out / "metrics.json").read_text())["final"]


def test_cpu_processes_split_the_batch(tiny_synth, tmp_path):
    """`mosmos pretrain ... train.cpu_processes=2` on a CPU: two ranks of half the batch each, one gloo
    group (mosmos.engine.launch), the same number of steps as one process with the whole batch."""
    out = tmp_path / "ranks"
    overrides = tiny_pretrain_overrides(tiny_synth, out, **{"train.epochs": 1, "train.batch_size": 8})
    cmd = [
        sys.executable,
        "-m",
        "mosmos",
        "pretrain",
        "--config",
        str(DEMO),
        *overrides,
        "train.cpu_processes=2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training as 2 data-parallel processes of 1 thread(s), batch 4 each" in proc.stderr
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert (ckpt / "random_states_1.pkl").is_file()
    # 18 training cases, 8 per step in all: 2 steps in the one epoch
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["batch_size"] == 4
