"""Check the import contracts of ``pyproject.toml`` ([tool.importlinter]) on the installed layout.

import-linter (through grimp) finds a package's modules by walking its folder, but mosmos installs
the top-level folders ``models/``, ``pretrain/``, ``finetune/`` and ``benchmark/`` inside the
``mosmos`` namespace through setuptools' ``package-dir`` mapping, which an editable install
resolves at import time only. So this script lays the checkout out as the wheel does — a
temporary ``mosmos/`` of symbolic links, read from the same ``package-dir`` table — and runs
``lint-imports`` on that. Usage: ``python tools/lint_imports.py`` (``make lint`` runs it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage_layout(dest: Path) -> Path:
    """Mirror the wheel's ``mosmos`` package under ``dest`` with symbolic links; return ``dest``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    mapping = project["tool"]["setuptools"]["package-dir"]
    package = dest / "mosmos"
    package.mkdir(parents=True)
    for entry in (ROOT / "mosmos").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if (ROOT / folder / "__init__.py").is_file():  # code packages; configs/ is data
            (package / name.removeprefix("mosmos.")).symlink_to(ROOT / folder)
    return dest


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mosmos-imports-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(stage_layout(Path(tmp)))}
        lint = Path(sys.executable).with_name("lint-imports")
        cmd = [str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"]
        return subprocess.run(cmd, env=env, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())
