"""The ``mosmos`` command line: clear errors without tracebacks (help: tests/test_help.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mosmos.cli import build_parser, main


def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"rescnn3d", "rescnn2d", "swinvit3d", "swinvit2d"} <= set(listed)


def test_config_error_is_one_line_not_a_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  table: r.csv\ntrain:\n  lr: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mosmos", "pretrain", "--config", str(cfg)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "train.lr" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_table_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\ndata:\n  table: {tmp_path / 'nope.csv'}\n")
    assert main(["pretrain", "--config", str(cfg)]) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_parser_requires_a_verb():
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
