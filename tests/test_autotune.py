"""train.num_workers: auto and train.channels_last: auto (mosmos.engine.autotune)."""

from __future__ import annotations

import json

import torch
from torch import nn

from mosmos.engine import autotune


def test_worker_count(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert autotune.resolve_num_workers(3, cpu) == 3
    monkeypatch.setattr(autotune, "cpus_per_process", lambda: 2)
    assert autotune.resolve_num_workers("auto", cpu) == 0  # a worker would take a core from the model
    assert autotune.resolve_num_workers("auto", gpu) == 1
    monkeypatch.setattr(autotune, "cpus_per_process", lambda: 3)
    assert autotune.resolve_num_workers("auto", cpu) == 1
    monkeypatch.setattr(autotune, "cpus_per_process", lambda: 1)
    assert autotune.resolve_num_workers("auto", cpu) == 0
    monkeypatch.setattr(autotune, "cpus_per_process", lambda: 32)
    assert autotune.resolve_num_workers("auto", gpu) == 8


def test_cpus_are_shared_by_local_processes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = autotune.cpus_per_process()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(alone * 4))
    assert autotune.cpus_per_process() == 1


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.Dropout(0.5), nn.Conv3d(4, 2, 1)
    )


def test_timing_both_layouts_leaves_model_and_rng_as_they_were():
    torch.manual_seed(0)
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 1, 6, 6, 6)
    seconds = autotune.measure_layouts(net, lambda m: m(x).square().mean(), steps=1)
    assert set(seconds) == {"default", "channels_last"} and all(s > 0 for s in seconds.values())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert all(p.grad is None for p in net.parameters())
    assert all(p.is_contiguous() for p in net.parameters())  # the trial ran on a copy
    after_timing = torch.rand(3)  # dropout drew in the trial steps, on a forked RNG
    torch.manual_seed(0)
    _net(), torch.randn(2, 1, 6, 6, 6)
    assert torch.equal(after_timing, torch.rand(3))


def test_auto_picks_the_faster_layout_once_per_run(tmp_path, monkeypatch):
    net = _net()
    timings = {"default": 2.0, "channels_last": 1.0}
    calls = []

    def fake(model, run_step, steps=2):
        calls.append(1)
        return dict(timings)

    monkeypatch.setattr(autotune, "measure_layouts", fake)
    assert autotune.choose_channels_last("auto", net, lambda m: None, tmp_path) is True
    record = json.loads((tmp_path / autotune.AUTOTUNE_FILE).read_text())
    assert record["channels_last"] is True and record["seconds_per_step"] == timings
    timings.update(default=0.5)  # a resumed run keeps the recorded choice, without timing again
    assert autotune.choose_channels_last("auto", net, lambda m: None, tmp_path) is True
    assert len(calls) == 1
    assert autotune.choose_channels_last("auto", net, lambda m: None, tmp_path / "new") is False
    assert autotune.choose_channels_last(False, net, lambda m: None, tmp_path) is False
    assert autotune.choose_channels_last(True, nn.Linear(2, 2), lambda m: None, tmp_path) is True
    # nothing to convert: no timing, default layout
    assert autotune.choose_channels_last("auto", nn.Linear(2, 2), lambda m: None, tmp_path / "lin") is False
    assert len(calls) == 2
