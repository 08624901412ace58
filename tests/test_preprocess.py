"""``mosmos preprocess``: fills the cache training reads, in parallel, sharded, resumable after a kill,
with corrupt entries rebuilt (by the command and by training)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mosmos.cli import main as cli
from mosmos.cli.preprocess import fill_cache, load_stage_config
from mosmos.config import load_config
from mosmos.errors import ConfigError
from mosmos.pretrain.config import PretrainConfig
from tests.conftest import REPO, tiny_pretrain_overrides
from tests.test_finetune_e2e import tiny_finetune_overrides

PRETRAIN = REPO / "configs" / "pretrain" / "demo.yaml"
FINETUNE = REPO / "configs" / "finetune" / "demo.yaml"
N_PRETRAIN = 24  # tiny_synth: 18 training volumes + 6 validation volumes with their label maps


def _pretrain_cfg(data: Path, root: Path, **extra) -> PretrainConfig:
    """The tiny stage 1 config; its cache is ``root / "cache"``."""
    return load_config(PretrainConfig, PRETRAIN, tiny_pretrain_overrides(data, root / "run", **extra))


def _entries(cache: Path) -> dict[str, bytes]:
    """Every complete entry under a cache root: relative path -> bytes."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.glob("*/*.pt"))}


def _no_recompute(volumes) -> None:
    def fail(item):
        raise AssertionError(f"recomputed {item}")

    volumes._pre_transform = fail


@pytest.fixture(scope="module")
def filled(tiny_synth, tmp_path_factory):
    """The tiny pretrain cache filled by one worker: (config, result, entries)."""
    root = tmp_path_factory.mktemp("one")
    cfg = _pretrain_cfg(tiny_synth, root)
    result = fill_cache(cfg, workers=1, rank=0, world=1, progress=False)
    return cfg, result, _entries(root / "cache")


def test_pretrain_entries_are_filled_and_training_reads_them_as_they_are(filled, tiny_synth):
    from mosmos.pretrain.data import build_datasets
    from mosmos.vocabulary import load_vocabulary

    cfg, result, entries = filled
    assert (result["entries"], result["total"], result["built"]) == (N_PRETRAIN, N_PRETRAIN, N_PRETRAIN)
    assert result["present"] == result["rebuilt"] == result["failed"] == 0
    assert len(entries) == N_PRETRAIN and result["volumes_per_s"] > 0
    cache = Path(cfg.data.cache_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in cache.glob("*/*.pt")}
    # training builds its datasets and reads every volume from the cache, computing none
    data = build_datasets(cfg, load_vocabulary(cfg.data.vocabulary, cfg.data.organs))
    for split in (data.train, data.val):
        _no_recompute(split.cached_volumes)
        items = [split[i] for i in range(len(split))]
        assert all(item["image"].shape == (1, 32, 32, 16) for item in items)
    assert len(data.train) + len(data.val) == N_PRETRAIN
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/*.pt")} == mtimes
    again = fill_cache(cfg, workers=0, progress=False)
    assert (again["present"], again["built"]) == (N_PRETRAIN, 0)


def test_finetune_entries_are_filled_and_training_reads_them(tiny_synth, tmp_path, capsys):
    from mosmos.finetune.config import FinetuneConfig
    from mosmos.finetune.data import build_seg_data, build_train_dataset, load_preprocess
    from mosmos.vocabulary import load_vocabulary

    overrides = tiny_finetune_overrides(tiny_synth, tmp_path / "run")
    assert cli(["preprocess", "--config", str(FINETUNE), *overrides, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "0 already there" in out and "0 rebuilt" in out and "volumes/s" in out
    cfg = load_config(FinetuneConfig, FINETUNE, overrides)
    data = build_seg_data(cfg, load_vocabulary(cfg.data.vocabulary))
    data.preprocess = load_preprocess(cfg)
    assert f"preprocess {len(data.train)} entries:" in out and f"{len(data.train)} built" in out
    patches = build_train_dataset(cfg, data, Path(cfg.output_dir))
    _no_recompute(patches.cached)
    assert all(patches.cached[i]["label"].ndim == 4 for i in range(len(data.train)))
    assert patches[0]["image"].shape == (1, 32, 32, 16)


def test_two_workers_write_the_same_bytes_as_one_and_as_this_process(filled, tiny_synth, tmp_path):
    _, _, entries = filled
    for workers in (2, 0):
        root = tmp_path / f"w{workers}"
        result = fill_cache(_pretrain_cfg(tiny_synth, root), workers=workers, progress=False)
        assert (result["built"], result["workers"]) == (N_PRETRAIN, workers)
        assert _entries(root / "cache") == entries


def test_shards_of_two_ranks_are_disjoint_and_fill_everything(filled, tiny_synth, tmp_path, monkeypatch):
    _, _, entries = filled
    first = fill_cache(_pretrain_cfg(tiny_synth, tmp_path / "r0"), workers=0, rank=0, world=2, progress=False)
    monkeypatch.setenv("RANK", "1")  # as `accelerate launch` sets it
    monkeypatch.setenv("WORLD_SIZE", "2")
    second = fill_cache(_pretrain_cfg(tiny_synth, tmp_path / "r1"), workers=0, progress=False)
    assert (second["rank"], second["world"]) == (1, 2)
    assert first["entries"] == second["entries"] == N_PRETRAIN
    assert first["built"] + second["built"] == N_PRETRAIN and abs(first["built"] - second["built"]) <= 1
    zero, one = _entries(tmp_path / "r0" / "cache"), _entries(tmp_path / "r1" / "cache")
    assert not set(zero) & set(one)
    assert {**zero, **one} == entries
    with pytest.raises(ConfigError, match="rank 2 of world size 2"):
        fill_cache(_pretrain_cfg(tiny_synth, tmp_path / "r1"), workers=0, rank=2, world=2, progress=False)


SLOW_RUN = """
import sys, time
from mosmos.cache import CheckedPersistentDataset

compute = CheckedPersistentDataset._pre_transform


def slow(self, item):  # tiny volumes preprocess in milliseconds: leave time to kill the run midway
    time.sleep(0.3)
    return compute(self, item)


CheckedPersistentDataset._pre_transform = slow
from mosmos.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_run_resumes_where_it_stopped(filled, tiny_synth, tmp_path):
    _, _, entries = filled
    cache = tmp_path / "cache"
    argv = ["preprocess", "--config", str(PRETRAIN), *tiny_pretrain_overrides(tiny_synth, tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_RUN, *argv, "--workers", "2"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,  # its own process group: the kill takes its workers too
        )
        try:
            deadline = time.monotonic() + 90
            while len(list(cache.glob("*/*.pt"))) < 4 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    done = _entries(cache)
    assert 4 <= len(done) < N_PRETRAIN, (tmp_path / "log.txt").read_text()[-2000:]
    assert all(entries[name] == blob for name, blob in done.items())  # what is there is complete
    result = fill_cache(_pretrain_cfg(tiny_synth, tmp_path), workers=2, progress=False)
    assert (result["present"], result["built"], result["rebuilt"]) == (len(done), N_PRETRAIN - len(done), 0)
    assert _entries(cache) == entries


def _damage(paths: list[Path]) -> None:
    """Truncate the first entry, overwrite the second with garbage, empty the third."""
    paths[0].write_bytes(paths[0].read_bytes()[: paths[0].stat().st_size // 2])
    paths[1].write_bytes(b"not a torch file\n" * 10)
    paths[2].write_bytes(b"")


def test_corrupt_entries_are_reported_and_rebuilt(filled, tiny_synth, tmp_path, caplog):
    _, _, entries = filled
    cache = tmp_path / "cache"
    shutil.copytree(Path(filled[0].data.cache_dir), cache)
    damaged = sorted(cache.glob("*/*.pt"))[::8][:3]
    _damage(damaged)
    with caplog.at_level(logging.WARNING, logger="mosmos"):
        result = fill_cache(_pretrain_cfg(tiny_synth, tmp_path), workers=0, progress=False)
    assert (result["present"], result["built"], result["rebuilt"]) == (N_PRETRAIN - 3, 0, 3)
    for path in damaged:
        assert any(str(path) in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records), path
    assert _entries(cache) == entries

    # a byte changed inside a tensor keeps the file readable: only --verify (CRC) catches it
    victim = damaged[0]
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    assert fill_cache(_pretrain_cfg(tiny_synth, tmp_path), workers=0, progress=False)["rebuilt"] == 0
    result = fill_cache(_pretrain_cfg(tiny_synth, tmp_path), workers=0, verify=True, progress=False)
    assert (result["present"], result["rebuilt"]) == (N_PRETRAIN - 1, 1)
    assert _entries(cache) == entries


def test_training_rebuilds_a_corrupt_entry_it_reads(filled, tiny_synth, tmp_path, caplog):
    from mosmos.pretrain.data import build_datasets
    from mosmos.vocabulary import load_vocabulary

    _, _, entries = filled
    cache = tmp_path / "cache"
    shutil.copytree(Path(filled[0].data.cache_dir), cache)
    cfg = _pretrain_cfg(tiny_synth, tmp_path)
    data = build_datasets(cfg, load_vocabulary(cfg.data.vocabulary, cfg.data.organs))
    volumes = data.val.cached_volumes
    damaged = [volumes.entry_path(i) for i in range(3)]
    _damage(damaged)
    with caplog.at_level(logging.WARNING, logger="mosmos"):
        items = [data.val[i] for i in range(3)]
    assert all(item["image"].shape == (1, 32, 32, 16) for item in items)
    for path in damaged:
        assert any(str(path) in r.getMessage() for r in caplog.records), path
    assert _entries(cache) == entries


def test_a_missing_table_is_the_error_training_gives(tiny_synth, tmp_path, capsys):
    from mosmos.pretrain.data import build_datasets
    from mosmos.vocabulary import load_vocabulary

    overrides = tiny_pretrain_overrides(tiny_synth, tmp_path / "run", **{"data.table": tmp_path / "no.csv"})
    assert cli(["preprocess", "--config", str(PRETRAIN), *overrides]) == 2
    err = capsys.readouterr().err
    cfg = load_config(PretrainConfig, PRETRAIN, overrides)
    with pytest.raises(Exception) as training:
        build_datasets(cfg, load_vocabulary(cfg.data.vocabulary, cfg.data.organs))
    assert err == f"mosmos preprocess: error: {training.value}\n" and "no.csv" in err


def test_an_unreadable_volume_is_named_and_the_others_are_filled(tiny_synth, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(tiny_synth / "pretrain" / "images", images)
    bad = sorted(images.glob("*.nii.gz"))[0]
    bad.write_bytes(b"garbage")
    # data.check=none: the start-up checks would stop on the bad file before any preprocessing
    overrides = tiny_pretrain_overrides(
        tiny_synth, tmp_path / "run", **{"data.image_root": images, "data.check": "none"}
    )
    assert cli(["preprocess", "--config", str(PRETRAIN), *overrides, "--workers", "2"]) == 2
    captured = capsys.readouterr()
    assert "1 volume(s) could not be preprocessed" in captured.err and str(bad) in captured.err
    assert "Traceback" not in captured.err and "23 built" in captured.out and "1 failed" in captured.out
    assert len(_entries(tmp_path / "cache")) == N_PRETRAIN - 1


def test_the_stage_is_detected_from_the_config(tmp_path):
    assert load_stage_config("pretrain/demo")[0] == "pretrain"
    assert load_stage_config(FINETUNE, ["train.epochs=1"])[0] == "finetune"
    assert load_stage_config("finetune/demo", stage="finetune")[0] == "finetune"
    with pytest.raises(ConfigError, match=r"data\.tabel"):  # a typo: the pretrain schema's own error
        load_stage_config("pretrain/demo", ["data.tabel=x.csv"])
    with pytest.raises(ConfigError, match="reads pretrain and finetune configs"):
        load_stage_config(REPO / "configs" / "benchmark" / "demo.yaml")
    (tmp_path / "bare.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="--stage"):  # neither data.table nor data.datasets
        load_stage_config(tmp_path / "bare.yaml")
    assert load_stage_config(tmp_path / "bare.yaml", ["data.table=t.csv"])[0] == "pretrain"
