"""train.cpu_processes: how many processes a stage splits into, and the ranks that run it."""

from __future__ import annotations

import textwrap

import pytest

from mosmos.engine.launch import plan_cpu_processes, run_ranks
from mosmos.errors import ConfigError


@pytest.mark.parametrize(
    ("setting", "batch", "cpus", "expected"),
    [
        ("auto", 16, 2, 2),  # the stage 1 demo on 2 cores: 2 x 8
        ("auto", 16, 4, 4),
        ("auto", 16, 8, 4),  # never below 4 samples a process
        ("auto", 12, 8, 3),  # the most that divide the batch evenly
        ("auto", 6, 4, 1),
        ("auto", 2, 16, 1),  # stage 2's small patch batches stay in one process
        ("auto", 16, 1, 1),
        (1, 16, 8, 1),
        (2, 2, 8, 2),  # a number is taken as asked
    ],
)
def test_plan_cpu_processes(setting, batch, cpus, expected):
    assert plan_cpu_processes(setting, batch, cpus=cpus, cuda=False, environ={}) == expected


def test_plan_one_process_on_gpu_or_under_a_launcher():
    assert plan_cpu_processes("auto", 16, cpus=8, cuda=True, environ={}) == 1
    assert plan_cpu_processes(4, 16, cpus=8, cuda=False, environ={"WORLD_SIZE": "2"}) == 1


def test_plan_refuses_a_count_that_does_not_divide_the_batch():
    with pytest.raises(ConfigError, match=r"train.cpu_processes=3 does not divide train.batch_size=16"):
        plan_cpu_processes(3, 16, cpus=8, cuda=False, environ={})


RANK_MODULE = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if sys.argv[1] == "fail" and rank == 1:
        sys.exit(3)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)  # rank 0 waits here forever when rank 1 failed: run_ranks must stop it
    with open(os.path.join(sys.argv[2], f"rank{rank}.txt"), "w") as f:
        f.write(f"{t.item()} {torch.get_num_threads()} {os.environ['WORLD_SIZE']}")
    dist.destroy_process_group()  # as a stage's end_training does: gloo may abort at exit otherwise
    """
)


def _rank_module(tmp_path, monkeypatch):
    (tmp_path / "rank_probe.py").write_text(RANK_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_run_ranks_forms_one_process_group(tmp_path, monkeypatch):
    _rank_module(tmp_path, monkeypatch)
    assert run_ranks("rank_probe", ["ok", str(tmp_path)], world=2, threads=1) == 0
    # 1 + 2 summed over the group, one thread each, two processes
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.txt")) == ["3.0 1 2", "3.0 1 2"]


def test_run_ranks_stops_the_others_when_one_fails(tmp_path, monkeypatch):
    _rank_module(tmp_path, monkeypatch)
    assert run_ranks("rank_probe", ["fail", str(tmp_path)], world=2, threads=1) == 3
    assert not list(tmp_path.glob("rank*.txt"))
