"""The documentation cannot drift from the code.

- ``docs/configuration.md`` is what ``tools/gen_config_docs.py`` generates from the config
  dataclasses today, and every config key has a description;
- the README is a page a user reads in five minutes (at most 200 lines);
- every ``mosmos`` command in the shell blocks of the README and of ``docs/`` parses with the real
  command line (verb, options, required arguments), names a shipped config or a file of one's own,
  and overrides only keys the config has; every ``make`` target exists;
- the README's Python example runs against a (tiny) stage 1 export;
- every YAML block of the docs parses, and a benchmark config among them has only known keys.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from mosmos.config import apply_overrides
from mosmos.errors import ConfigError
from mosmos.resources import configs_dir, resolve_config
from tests.conftest import REPO

README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").rglob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.S | re.M)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
YAML_BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.S | re.M)
SEPARATORS = {"&&", "||", ";", "|"}
#: ``python -m`` / ``accelerate launch -m`` modules -> the ``mosmos`` verb they run
MODULE_VERBS = {"mosmos.pretrain": "pretrain", "mosmos.finetune": "finetune", "mosmos.benchmark": "benchmark"}


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "tools" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date():
    gen = _generator()
    current = gen.OUTPUT.read_text(encoding="utf-8") if gen.OUTPUT.is_file() else ""
    assert current == gen.render(), (
        f"docs/configuration.md is stale: regenerate it with `{gen.COMMAND}` (from the repository root)"
    )


def test_every_config_key_has_a_description():
    missing = _generator().missing_descriptions()
    assert not missing, (
        f"config keys without a description: {missing}; give each field a comment (same line or the "
        "lines above) in its dataclass, then run `python tools/gen_config_docs.py`"
    )


def test_the_generator_reads_comments_above_beside_and_inherited():
    gen = _generator()
    from mosmos.finetune.config import FinetuneConfig
    from mosmos.pretrain.config import PretrainConfig

    rows = {key: doc for _, table in gen.section_rows(PretrainConfig) for key, _, _, doc in table}
    assert rows["data.table"].startswith("report table")  # same-line comment
    assert rows["data.check"].startswith("the start-up checks")  # comment lines above
    assert "report text" in rows["data.report_columns"]  # comment after a multi-line default
    assert rows["train.lr"].startswith("peak learning rate")  # declared in the shared TrainConfig
    assert rows["model.tag_head.margin"]  # nested section
    types = {key: tp for _, table in gen.section_rows(FinetuneConfig) for key, tp, _, _ in table}
    assert types["data.spacing"] == "`list[float] \\| null`"


def test_readme_is_at_most_200_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines; keep it a user's page and move the rest to docs/"


def _commands(text: str) -> list[list[str]]:
    """The commands of every shell block: continuation lines joined, comments dropped, split at
    ``&&``, ``;`` and pipes."""
    out = []
    for block in SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            command: list[str] = []
            for token in [*tokens, ";"]:
                if token in SEPARATORS:
                    if command:
                        out.append(command)
                    command = []
                else:
                    command.append(token)
    return out


def _mosmos_args(command: list[str]) -> list[str] | None:
    """The ``mosmos`` argument list a command runs (verb first), or None for other programs."""
    if Path(command[0]).name == "mosmos":
        return command[1:]
    if "-m" in command[:-1]:
        module = command[command.index("-m") + 1]
        rest = command[command.index("-m") + 2 :]
        if module == "mosmos":
            return rest
        if module in MODULE_VERBS:
            return [MODULE_VERBS[module], *rest]
    return None


def _config_class(verb: str, path: Path):
    from mosmos.benchmark.config import BenchmarkConfig
    from mosmos.finetune.config import FinetuneConfig
    from mosmos.pretrain.config import PretrainConfig

    classes = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "benchmark": BenchmarkConfig}
    section = path.parent.name if path.parent.parent == configs_dir() else verb
    return classes.get(section)


def _check_mosmos(args: list[str], where: str) -> None:
    from mosmos.cli import build_parser

    if not args:
        return
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
            parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        assert exc.code == 0, f"{where}: `mosmos {shlex.join(args)}` does not parse:\n{stdout.getvalue()}"
        return
    config = getattr(parsed, "config", None)
    if config is None:
        return
    try:
        path = resolve_config(config)
    except ConfigError as err:
        # a user's own file is fine; a shipped name or a configs/ path must exist
        own_file = config.endswith((".yaml", ".yml")) and not config.startswith("configs/")
        assert own_file, f"{where}: --config {config}: {err}"
        return
    cls = _config_class(args[0], path)
    overrides = getattr(parsed, "overrides", None) or []
    if cls is not None and overrides:
        try:
            apply_overrides({}, list(overrides), cls)
        except ConfigError as err:
            pytest.fail(f"{where}: `mosmos {shlex.join(args)}`: {err}")


def _check_accelerate(command: list[str], where: str) -> None:
    if "--config_file" in command:
        config_file = command[command.index("--config_file") + 1]
        assert (REPO / config_file).is_file(), (
            f"{where}: accelerate --config_file {config_file} does not exist"
        )


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_-]+):", text, re.M))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_commands_in_the_docs_exist(doc):
    commands = _commands(doc.read_text(encoding="utf-8"))
    where = str(doc.relative_to(REPO))
    for command in commands:
        if command[0] == "make":
            assert set(command[1:]) <= _make_targets(), f"{where}: `{shlex.join(command)}`: no such target"
            continue
        if command[:2] == ["accelerate", "launch"]:
            _check_accelerate(command, where)
        args = _mosmos_args(command)
        if args is not None:
            _check_mosmos(args, where)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_blocks_in_the_docs_parse_and_benchmark_configs_have_known_keys(doc, monkeypatch):
    """A config a reader copies out of the docs loads (an unquoted ``[48,48,32]`` inside a flow list
    once did not). Keys and types are checked; the checks that need the user's files are not (a
    block may be a fragment)."""
    import yaml

    from mosmos.benchmark.config import BenchmarkConfig
    from mosmos.config import from_dict

    monkeypatch.setattr(BenchmarkConfig, "validate", lambda self: None)
    where = str(doc.relative_to(REPO))
    for block in YAML_BLOCK.findall(doc.read_text(encoding="utf-8")):
        try:
            tree = yaml.safe_load(block)
        except yaml.YAMLError as err:
            pytest.fail(f"{where}: a YAML block does not parse: {str(err).splitlines()[0]}")
        if isinstance(tree, dict) and ("strategies" in tree or "partial_strategies" in tree):
            try:
                from_dict(BenchmarkConfig, tree)
            except ConfigError as err:
                pytest.fail(f"{where}: a benchmark config block: {err}")


def test_the_readme_names_its_test_command_and_shows_mosmos_commands():
    commands = _commands(README.read_text(encoding="utf-8"))
    assert ["make", "test"] in commands  # .ci/run calls `make test`: the README must say the same
    verbs = {args[0] for c in commands if (args := _mosmos_args(c))}
    assert {"pretrain", "finetune", "evaluate", "predict"} <= verbs


def test_the_command_checks_can_fail():
    # each kind of drift is caught: an unknown verb, an unknown option, an unknown config, a bad key
    bad = [
        ["export", "runs/pretrain"],
        ["predict", "--model", "m", "--input", "i", "--output", "o", "--fast"],
        ["pretrain", "--config", "pretrain/nonexistent"],
        ["pretrain", "--config", "pretrain/demo", "train.epoch=3"],
    ]
    for args in bad:
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            _check_mosmos(args, "test")
    _check_mosmos(["pretrain", "--config", "pretrain/demo", "train.epochs=3"], "test")
