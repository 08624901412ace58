"""The wheel a user installs: one top-level package, shipped configs, no clash with the user's folders.

Built from this checkout (not the editable install) and installed with ``pip --target`` into a
temporary folder; every command then runs from an unrelated directory that has its own
``models/`` and ``pretrain/`` packages, as a researcher's repository might.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_pretrain_overrides


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy without build outputs, so a stale build/ folder cannot hide a missing package
    source = tmp_path_factory.mktemp("source") / "mosmos"
    junk = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "demo_out", "runs")
    shutil.copytree(REPO, source, ignore=junk)
    out = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    subprocess.run([*pip, str(source)], check=True, capture_output=True)
    (path,) = out.glob("mosmos-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    return target


@pytest.fixture(scope="module")
def user_repo(tmp_path_factory) -> Path:
    """A user's research folder with packages named like ours."""
    repo = tmp_path_factory.mktemp("user_repo")
    for name in ("models", "pretrain", "finetune"):
        (repo / name).mkdir()
        (repo / name / "__init__.py").write_text(f"WHOSE = 'user {name}'\n")
    (repo / "pretrain" / "__main__.py").write_text("raise SystemExit('the user pretrain ran')\n")
    return repo


def _run(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_wheel_installs_one_top_level_package_with_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"mosmos"}
    for shipped in ("organs.yaml", "pretrain/demo.yaml", "finetune/demo.yaml", "benchmark/demo.yaml"):
        assert f"mosmos/configs/{shipped}" in names
    # every Python file of the installed folders is in the wheel (a package missing from
    # pyproject's explicit list would otherwise vanish from a non-editable install)
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    folders = {"mosmos": "mosmos", **{name.replace(".", "/"): folder for name, folder in mapping.items()}}
    expected = set()
    for installed, folder in folders.items():
        for path in (REPO / folder).rglob("*.py"):
            relative = path.relative_to(REPO / folder)
            if "__pycache__" not in relative.parts and not (
                folder == "mosmos" and relative.parts[0] in mapping
            ):
                expected.add(f"{installed}/{relative.as_posix()}")
    assert expected <= set(names), sorted(expected - set(names))


def test_installed_mosmos_does_not_clash_with_the_users_folders(installed, user_repo):
    code = (
        "import models, pretrain, mosmos, mosmos.models, mosmos.pretrain.train;"
        "from mosmos.vocabulary import DEFAULT_VOCABULARY;"
        "print(models.WHOSE, pretrain.WHOSE, mosmos.models.__file__, DEFAULT_VOCABULARY, sep='|')"
    )
    result = _run(installed, user_repo, "-c", code)
    assert result.returncode == 0, result.stderr
    user_models, user_pretrain, ours, vocabulary = result.stdout.strip().split("|")
    assert (user_models, user_pretrain) == ("user models", "user pretrain")
    assert Path(ours).is_relative_to(installed) and Path(vocabulary).is_relative_to(installed)
    assert Path(vocabulary).is_file()
    help_text = _run(installed, user_repo, "-m", "mosmos", "demo", "--help")
    assert help_text.returncode == 0 and "--out" in help_text.stdout


def test_installed_stage_runs_a_shipped_config_by_name(installed, user_repo, tiny_synth, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_pretrain_overrides(tiny_synth, run, **{"train.epochs": 1, "eval.attention_overlays": 0})
    result = _run(installed, user_repo, "-m", "mosmos.pretrain", "--config", "pretrain/demo", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the user pretrain ran" not in result.stderr
    assert (run / "encoder.safetensors").is_file() and (run / "metrics.json").is_file()
