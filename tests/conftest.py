"""Shared fixtures: a tiny synthetic data set generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """32 x 32 x 24 phantoms: 24 image-report pairs, 2 cases per segmentation dataset, 1 test case."""
    from mosmos.synth import synthesize

    out = tmp_path_factory.mktemp("tiny_synth")
    synthesize(out, seed=0, pretrain_cases=24, seg_cases=2, test_cases=1, shape=(32, 32, 24), progress=False)
    return out


def tiny_pretrain_overrides(data: Path, run: Path, **extra) -> list[str]:
    """Overrides that turn configs/pretrain/demo.yaml into a seconds-long run on ``tiny_synth``."""
    base = {
        "output_dir": str(run),
        "data.table": str(data / "pretrain" / "reports.csv"),
        "data.image_root": str(data / "pretrain" / "images"),
        "data.ground_truth": str(data / "pretrain" / "ground_truth"),
        "data.cache_dir": str(run.parent / "cache"),
        "data.size": "[32,32,16]",
        "data.spacing": "[10.0,10.0,14.0]",
        "data.val_fraction": "0.25",
        "model.encoder_kwargs": "{channels: [8, 16, 16, 16], strides: [2, 2, 2, 2], num_res_units: 1, norm: batch}",
        "model.text_kwargs": "{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}",
        "model.tokenizer_vocab_size": "200",
        "model.embed_dim": "16",
        "model.tag_head.dim": "16",
        "train.epochs": "3",
        "train.batch_size": "4",
        "train.warmup_steps": "2",
        "train.checkpoint_every": "4",
        "train.eval_every": "1",
        "train.queue_size": "8",
        "train.deterministic": "true",
        "eval.attention_overlays": "1",
        # fixed, not auto: runs that must match bit for bit need the same layout, and a worker
        # process per epoch would cost more than these tiny runs' steps
        "train.channels_last": "false",
        "train.num_workers": "0",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


REPO = Path(__file__).resolve().parent.parent


# Test files whose assertions compare floating-point results. `make test-avx2` (run by CI) runs them
# again with ATen's and oneDNN's kernels capped at AVX2, whose roundings differ from AVX-512's.
NUMERICS_FILES = {
    "test_channels_last.py",
    "test_distributed_loss.py",
    "test_engine.py",
    "test_export.py",
    "test_finetune_metrics.py",
    "test_losses.py",
    "test_models_encoders.py",
    "test_models_pretrain.py",
    "test_models_segmentation.py",
    "test_pretrain_metrics.py",
    "test_pretrain_objective.py",
    "test_seg_losses.py",
    "test_transforms.py",
}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        name = item.path.name
        if name in NUMERICS_FILES or name.startswith("test_models_pretrain"):
            item.add_marker(pytest.mark.numerics)
