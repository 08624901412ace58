"""Atomic writes: the target is replaced whole or not at all."""

from __future__ import annotations

import json
import os

import pytest

from mosmos.io import atomic_path, atomic_write_text, library_versions, write_json


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_library_versions_lists_the_stack():
    versions = library_versions()
    for pkg in ("torch", "monai", "transformers", "accelerate", "datasets", "safetensors"):
        assert versions[pkg] != "not installed"
