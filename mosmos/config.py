"""Typed configs filled from YAML plus dotted ``key=value`` overrides.

A config is a tree of dataclasses. Loading checks every key and type up front and fails with
a :class:`ConfigError` that names the key and lists the valid choices, before any work starts.
Dataclasses instead of a schema library: the same classes document the fields (one comment
each), give defaults, and type-check without another dependency.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from mosmos.errors import ConfigError
from mosmos.resources import resolve_config

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lossless cases (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not valid; choose one of {list(get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: a value is required ({_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if origin is tuple and Ellipsis not in get_args(tp) and len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
        item_types = (
            args
            if origin is tuple and Ellipsis not in get_args(tp)
            else [args[0] if args else Any] * len(value)
        )
        items = [_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types, strict=True))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where "3e-3" (no dot) is a string, not a number
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _check_retired(cls: type, keys: Any, prefix: str) -> None:
    """Raise for the first key that ``cls`` lists in its ``RETIRED_KEYS`` class variable (old key ->
    what became of it), so that a config of an earlier version fails with the reason."""
    retired = getattr(cls, "RETIRED_KEYS", {})
    for key in keys:
        if key in retired:
            raise ConfigError(f"{prefix}{key}: {retired[key]}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_retired(cls, data, prefix)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"unknown key(s) {[prefix + k for k in unknown]} at {where}; valid keys: {sorted(fields)}"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field without a default
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-safe Python (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001). Values are read as YAML (``[a,b]`` is a list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], cls: type | None = None) -> dict:
    """Apply dotted overrides to a nested mapping; with ``cls``, unknown keys fail with the valid ones."""
    for text in overrides:
        path, value = parse_override(text)
        node, node_cls = data, cls
        for i, part in enumerate(path):
            if node_cls is not None and dataclasses.is_dataclass(node_cls):
                names = {f.name for f in dataclasses.fields(node_cls)}
                if part not in names:
                    _check_retired(node_cls, [part], ".".join(path[:i]) + "." if i else "")
                    where = ".".join(path[:i]) or "top level"
                    raise ConfigError(
                        f"unknown key {'.'.join(path)!r} at {where}; valid keys: {sorted(names)}"
                    )
                hint = typing.get_type_hints(node_cls)[part]
                node_cls = hint if dataclasses.is_dataclass(hint) else None
            if i == len(path) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read a YAML config into ``cls``, apply dotted overrides, check everything."""
    data: dict = {}
    if path is not None:
        path = resolve_config(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [], cls)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def dump_config(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def check_divisible(key: str, size: list[int] | tuple[int, ...], stride: int, why: str) -> None:
    """Raise a :class:`ConfigError` naming the nearest valid sizes unless every axis of ``size`` is a
    multiple of ``stride`` (the network's total downsampling)."""
    if all(int(s) % stride == 0 for s in size):
        return
    down = [max(stride, int(s) // stride * stride) for s in size]
    up = [-(-int(s) // stride) * stride for s in size]
    raise ConfigError(
        f"{key}={list(size)} must be divisible by {stride} on every axis ({why}); "
        f"nearest valid sizes: {down} or {up}"
    )
