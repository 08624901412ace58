"""The benchmark modules composed by benchmarks/run.py: FLOP counts against hand counts, the row
format, and each module's pieces on minimal settings."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from mosmos.config import load_config
from mosmos.pretrain.config import PretrainConfig
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmarks are scripts importing each other

import common
import inference as bench_inference
import memory
import roofline


def _check_row(r: dict) -> None:
    assert tuple(r) == common.ROW_KEYS
    assert isinstance(r["name"], str) and isinstance(r["unit"], str) and isinstance(r["note"], str)
    assert math.isfinite(r["value"])
    if r["baseline"] is None:
        assert r["ratio"] is None and r["baseline_name"] is None
    else:
        assert r["ratio"] > 0 and r["baseline_name"] and r["note"].startswith("ratio = ")
    assert (r["goal"] is None) == (r["met"] is None)


# ------------------------------------------------------------------------------- FLOP counting
def test_flops_of_a_linear_layer_match_the_hand_count():
    m, k, n = 4, 6, 5
    layer = nn.Linear(k, n)
    x = torch.randn(m, k, requires_grad=True)
    assert roofline.count_flops(lambda: layer(x)) == 2 * m * n * k
    # backward: grad input (M x N @ N x K) and grad weight (N x M @ M x K), each as costly as forward
    assert roofline.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * m * n * k


def test_flops_of_a_conv3d_match_the_hand_count():
    batch, cin, cout, k, out_shape = 2, 3, 4, 3, (5, 6, 7)
    conv = nn.Conv3d(cin, cout, k, padding=1)
    forward = 2 * cin * cout * k**3 * math.prod(out_shape) * batch
    x = torch.randn(batch, cin, *out_shape, requires_grad=True)
    assert roofline.count_flops(lambda: conv(x)) == forward
    assert roofline.count_flops(lambda: conv(x).sum().backward()) == 3 * forward
    # a first layer (input without gradient) skips grad input: backward = forward
    first = torch.randn(batch, cin, *out_shape)
    assert roofline.count_flops(lambda: conv(first).sum().backward()) == 2 * forward
    assert roofline.gflops_per_s(3 * 10**9, 1.5) == pytest.approx(2.0)


def test_roofline_rows_on_tiny_shapes(monkeypatch):
    monkeypatch.setitem(roofline.SIZES, True, (32, (1, 4, 8), 1))
    monkeypatch.setattr(roofline, "MIN_CALL_S", 0.001)
    monkeypatch.setattr(roofline, "native_bf16", lambda device: True)  # the bf16 rows too
    rows = roofline.measure(quick=True, device="cpu", stage="all")
    for r in rows:
        _check_row(r)
        assert r["unit"] == "GFLOP/s" and r["value"] > 0
    names = {r["name"] for r in rows}
    assert roofline.PEAK_ROW in names and "roofline/conv3d_bf16" in names
    peak = next(r for r in rows if r["name"] == roofline.PEAK_ROW)
    layouts = next(r for r in rows if r["name"] == "roofline/conv3d_fp32_channels_last")
    assert peak["value"] == max(layouts["value"], layouts["baseline"])


# ------------------------------------------------------------------------------------ row format
def test_row_ratio_direction_and_goal():
    faster = common.row("x/time", 2.0, "s", 3.0, "old", inverse=True, goal=">= 1.0x")
    assert faster["ratio"] == pytest.approx(1.5) and faster["met"] is True
    assert faster["note"].startswith("ratio = baseline / value")
    grown = common.row("x/rss", 130.0, "MiB", 100.0, "at N", goal="<= 1.2x", note="warm")
    assert grown["ratio"] == pytest.approx(1.3) and grown["met"] is False
    assert grown["note"] == "ratio = value / baseline; warm"
    plain = common.row("x/dice", 0.995, "Dice", goal=">= 0.99")
    assert plain["ratio"] is None and plain["met"] is True and plain["note"] == ""
    for r in (faster, grown, plain):
        _check_row(r)
    with pytest.raises(ValueError, match="no baseline"):
        common.row("x/y", 1.0, "s", goal=">= 1.0x")
    with pytest.raises(ValueError, match="must look like"):
        common.row("x/y", 1.0, "s", 2.0, "b", goal="at least 1")
    assert "x/rss" in common.format_rows([faster, grown, plain])


def test_best_of_alternates_and_warms_up():
    calls = []
    best = common.best_of({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2)
    assert calls == ["a", "b"] * 3 and set(best) == {"a", "b"} and min(best.values()) >= 0


# ------------------------------------------------------------------------------------- inference
def test_label_agreement_on_a_hand_worked_case():
    a = np.array([0, 1, 1, 2, 2, 0])
    b = np.array([0, 1, 0, 2, 2, 3])
    # organ 1: 2*1/(2+1); organ 2: 1; organ 3: 0 (only in b)
    assert bench_inference.label_agreement(a, b) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert bench_inference.label_agreement(a * 0, b * 0) == 1.0


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads wait on each other far longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["unet", "mo_ctrans"])
def test_inference_rows_on_the_tiny_phantoms(tiny_synth, one_thread, name):
    # ~29 x 27 x 17 voxels of 10 x 10 x 14 mm: two overlapping 32 x 32 x 16 windows a volume
    model, spec = bench_inference.demo_model(name, tiny_synth, "cpu", [10.0, 10.0, 14.0], [32, 32, 16])
    images = sorted((tiny_synth / "nnUNet_raw" / bench_inference.TEST_DATASET).glob("images*/*.nii.gz"))
    rows = bench_inference._measure_model(name, model, spec, images, repeats=1, device="cpu")
    for r in rows:
        _check_row(r)
    by_name = {r["name"].split("/")[1]: r for r in rows}
    assert set(by_name) == {f"{name}_{k}" for k in ("predict", "windows", "label_agreement")}
    assert by_name[f"{name}_windows"]["goal"] == ">= 1.0x"
    assert by_name[f"{name}_predict"]["ratio"] == pytest.approx(
        by_name[f"{name}_predict"]["baseline"] / by_name[f"{name}_predict"]["value"]
    )
    assert 0 <= by_name[f"{name}_label_agreement"]["value"] <= 1


def test_inference_has_no_stage_1_rows():
    assert bench_inference.measure(quick=True, device="cpu", stage="1") == []


# ---------------------------------------------------------------------------------------- memory
def test_peak_rss_sees_a_child_allocation(tmp_path):
    size = 200 * 2**20
    code = f"b = bytearray({size}); b[::4096] = b'x' * len(b[::4096])"
    peak = memory.peak_rss([sys.executable, "-c", code], tmp_path / "log")
    assert size < peak < size + 200 * 2**20
    with pytest.raises(RuntimeError, match="exit 3"):
        memory.peak_rss([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "log")


@pytest.mark.parametrize("quick", [True, False])
def test_stage1_overrides_are_a_valid_one_epoch_config(tmp_path, quick):
    overrides = memory.stage1_overrides(tmp_path / "data", tmp_path / "work", quick)
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/demo.yaml", overrides)
    assert cfg.train.epochs == 1 and cfg.eval.attention_overlays == 0
    assert cfg.data.cache_dir == str(tmp_path / "work" / "cache")
    assert memory.measure(quick=True, device="cpu", stage="2") == []
