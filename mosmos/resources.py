"""Files that ship with mosmos: the ``configs/`` folder (organ vocabulary, stage configs).

``configs/`` is package data (``mosmos.configs`` in the wheel). In a source checkout (editable
install) it is the repository's top-level ``configs/`` folder, so both layouts are looked up here
and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

from mosmos.errors import ConfigError

_HERE = Path(__file__).resolve().parent


def configs_dir() -> Path:
    """The shipped ``configs/`` folder: inside the installed package, or the checkout's top level."""
    for candidate in (_HERE / "configs", _HERE.parent / "configs"):
        if (candidate / "organs.yaml").is_file():
            return candidate
    raise ConfigError(
        f"the shipped configs/ folder is missing (looked in {_HERE / 'configs'}); reinstall mosmos"
    )


def shipped_configs(section: str | None = None) -> list[str]:
    """Names of the shipped stage configs (``pretrain/demo``, ...), optionally of one section."""
    root = configs_dir()
    names = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.yaml"))
    return [n for n in names if section is None or n.startswith(f"{section}/")]


def resolve_config(name: str | Path) -> Path:
    """A config file path, or the name of a shipped config (``pretrain/demo``, ``finetune/demo.yaml``).

    A path that exists wins; otherwise the name is looked up in the shipped ``configs/``.

    Raises:
        ConfigError: neither a file nor a shipped config; the message lists the shipped names.
    """
    path = Path(name)
    if path.is_file():
        return path
    text = str(name).removeprefix("configs/")
    shipped = configs_dir() / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
    if not path.is_absolute() and shipped.is_file():
        return shipped
    raise ConfigError(
        f"config file {path} does not exist, and {text!r} is not a shipped config; "
        f"shipped configs: {shipped_configs()}"
    )
