"""Write docs/configuration.md from the config dataclasses: every key, its type, default and description.

The description of a field is its ``metadata["doc"]`` when set, else its source comments: the
trailing comment of the field's line(s), after the comment lines right above it. Nested dataclasses
(``data``, ``model.tag_head``, ...) become their own tables; a base class's fields (the shared
``train`` section) are described where they are declared.

Usage::

    python tools/gen_config_docs.py           # rewrite docs/configuration.md
    python tools/gen_config_docs.py --check   # exit 1 when docs/configuration.md is stale

``tests/test_docs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "configuration.md"
COMMAND = "python tools/gen_config_docs.py"

#: (title, "module:Class", what the config is for, how it is run)
STAGES = (
    (
        "Stage 1: pretrain",
        "mosmos.pretrain.config:PretrainConfig",
        "Report-supervised pretraining of the image encoder.",
        "mosmos pretrain --config pretrain/default KEY=VALUE ...",
    ),
    (
        "Stage 2: finetune",
        "mosmos.finetune.config:FinetuneConfig",
        "One segmentation network from several partially labelled datasets.",
        "mosmos finetune --config finetune/default KEY=VALUE ...",
    ),
    (
        "Benchmark",
        "mosmos.benchmark.config:BenchmarkConfig",
        "Initialisation strategy x label fraction x seed grid.",
        "mosmos benchmark --config benchmark/default KEY=VALUE ...",
    ),
)
MISSING_DOC = "(no description)"
#: dict-valued options whose keys are documented by a commented module-level dict literal
DICT_OPTIONS = (("data.augment_options", "mosmos.transforms", "AUGMENT_DEFAULTS"),)


def _load(spec: str) -> Any:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _comments(lines: list[str]) -> dict[int, str]:
    """Line number (1-based) -> the text of the comment on that line, ``#`` / ``#:`` stripped."""
    out: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
            if tok.type == tokenize.COMMENT:
                out[tok.start[0]] = tok.string.lstrip("#:").strip()
    except (tokenize.TokenError, IndentationError):
        pass
    return out


def _describe(lines: list[str], node: ast.AST, comments: dict[int, str]) -> str:
    """The comment lines right above ``node`` then the comments on its own lines, as one line."""
    above: list[str] = []
    line = node.lineno - 1
    while line >= 1 and lines[line - 1].strip().startswith("#"):
        above.insert(0, comments.get(line, ""))
        line -= 1
    own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
    return " ".join(part for part in above + own if part)


@functools.cache
def _class_docs(cls: type) -> dict[str, str]:
    """Field name -> description, from the comments in ``cls``'s own source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines(keepends=True)
    comments = _comments(lines)
    [node] = ast.parse(source).body
    docs: dict[str, str] = {}
    group, previous_end = "", -1
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            doc = _describe(lines, stmt, comments)
            if lines[stmt.lineno - 2].lstrip().startswith("#"):
                group = doc  # a comment block above a run of fields describes the whole run
            elif not doc and stmt.lineno == previous_end + 1:
                doc = group
            else:
                group = ""
            docs[stmt.target.id] = doc
            previous_end = stmt.end_lineno
    return docs


def field_doc(cls: type, f: dataclasses.Field) -> str:
    """A field's description: ``metadata["doc"]``, else the comments where the field is declared."""
    if f.metadata.get("doc"):
        return " ".join(str(f.metadata["doc"]).split())
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass) and f.name in inspect.get_annotations(klass):
            return _class_docs(klass).get(f.name, "")
    return ""


def dict_option_docs(module: str, name: str) -> list[tuple[str, Any, str]]:
    """(key, default, comment) of each entry of the dict literal ``module.name``."""
    mod = importlib.import_module(module)
    values = getattr(mod, name)
    lines = inspect.getsource(mod).splitlines(keepends=True)
    comments = _comments(lines)
    out = []
    for stmt in ast.parse("".join(lines)).body:
        target = stmt.target if isinstance(stmt, ast.AnnAssign) else getattr(stmt, "targets", [None])[0]
        if isinstance(target, ast.Name) and target.id == name and isinstance(stmt.value, ast.Dict):
            for key in stmt.value.keys:
                if isinstance(key, ast.Constant) and key.value in values:
                    out.append((key.value, values[key.value], comments.get(key.lineno, "")))
    return out


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is typing.Any:
        return "any"
    if origin is Literal:
        return " | ".join(_yaml(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [type_name(a) for a in get_args(tp) if a is not Ellipsis]
        return f"list[{', '.join(args)}]" if args else "list"
    if origin is dict:
        args = [type_name(a) for a in get_args(tp)]
        return f"dict[{', '.join(args)}]" if args else "dict"
    if tp is dict:
        return "dict"
    return getattr(tp, "__name__", str(tp))


def _yaml(value: Any) -> str:
    """A value as it would be written in a YAML config (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def section_rows(cls: type, prefix: str = "") -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """[(section key, [(key, type, default, description), ...]), ...]: ``cls``'s table, then one
    per nested dataclass, depth first."""
    hints = typing.get_type_hints(cls)
    rows: list[tuple[str, str, str, str]] = []
    nested: list[tuple[str, list]] = []
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        doc = field_doc(cls, f)
        if dataclasses.is_dataclass(tp):
            rows.append((key, "section", "table below", doc or f"the `{key}` settings"))
            nested.extend(section_rows(tp, key + "."))
            continue
        default = _default(f)
        shown = "(required)" if default is dataclasses.MISSING else _code(_yaml(default))
        rows.append((key, _code(type_name(tp)), shown, doc or MISSING_DOC))
    return [(prefix.rstrip("."), rows), *nested]


def missing_descriptions() -> list[str]:
    """Every config key without a description (comment or ``metadata["doc"]``)."""
    return [
        key
        for _, spec, _, _ in STAGES
        for _, rows in section_rows(_load(spec))
        for key, _, _, doc in rows
        if doc == MISSING_DOC
    ]


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the config dataclasses by `{COMMAND}`; do not edit by hand. -->",
        "",
        "Every stage reads one YAML file plus dotted `key=value` overrides on the command line",
        "(`train.epochs=3`, lists as `data.datasets=[a,b]`, mappings as `data.augment_options='{scale: 0}'`).",
        "A shipped config can be named without a path (`pretrain/demo`, `finetune/default`). An unknown",
        "key or a wrong type stops the run before any work and lists the valid keys. Every run writes",
        "the resolved config to `RUN/config.yaml`. Units: lengths in mm, sizes in voxels, steps are",
        "optimizer steps; `null` is YAML's none.",
        "",
    ]
    for title, spec, what, command in STAGES:
        cls = _load(spec)
        out += [f"## {title}", "", f"{what} Class `{spec.replace(':', '.')}`; run as `{command}`.", ""]
        for section, rows in section_rows(cls):
            if section:
                out += [f"### {section}", ""]
                klass_doc = _section_class(cls, section).__doc__ or ""
                if klass_doc and not klass_doc.startswith(_section_class(cls, section).__name__ + "("):
                    out += [" ".join(klass_doc.split()), ""]
            out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
            out += [f"| `{key}` | {tp} | {default} | {_cell(doc)} |" for key, tp, default, doc in rows]
            out.append("")
            retired = getattr(_section_class(cls, section), "RETIRED_KEYS", {})
            if retired:
                out += [
                    "Keys of earlier versions (a config that still names one fails with this reason):",
                    "",
                ]
                out += [f"- `{section}.{k}`: {_cell(v)}" for k, v in retired.items()]
                out.append("")
            for key, module, name in DICT_OPTIONS:
                if key.rsplit(".", 1)[0] == section and key in {r[0] for r in rows}:
                    out += [f"Keys of `{key}` (each optional; `{module}.{name}`):", ""]
                    out += ["| key | default | description |", "| --- | --- | --- |"]
                    out += [
                        f"| `{k}` | `{_yaml(v)}` | {_cell(d)} |" for k, v, d in dict_option_docs(module, name)
                    ]
                    out.append("")
    return "\n".join(out).rstrip() + "\n"


def _section_class(cls: type, section: str) -> type:
    for part in filter(None, section.split(".")):
        cls = typing.get_type_hints(cls)[part]
    return cls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is stale; regenerate it with `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
