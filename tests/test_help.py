"""``--help`` for every ``mosmos`` verb (read from the parser, so a new verb is covered) and for each
stage's ``python -m`` entry point."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from mosmos.cli import build_parser, main


def _verbs() -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


VERBS = _verbs()


def test_the_top_level_help_lists_every_verb(capsys):
    # a floor, not the list: the parametrisation below follows whatever the parser registers
    assert {
        "synth",
        "check",
        "tags",
        "preprocess",
        "pretrain",
        "finetune",
        "evaluate",
        "predict",
        "benchmark",
        "models",
        "demo",
    } <= set(VERBS)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    listed = capsys.readouterr().out
    assert all(f"    {verb} " in listed or f"    {verb}\n" in listed for verb in VERBS)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help_that_documents_each_argument(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mosmos {verb}")
    for action in VERBS[verb]._actions:
        assert action.help and action.help != argparse.SUPPRESS, (verb, action.dest)
        for option in action.option_strings:
            assert option in out, (verb, option)


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "benchmark"])
def test_python_m_stage_help(stage):
    proc = subprocess.run(
        [sys.executable, "-m", f"mosmos.{stage}", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ") and "--config" in proc.stdout
    assert "Traceback" not in proc.stderr
