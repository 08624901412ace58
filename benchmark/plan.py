"""The benchmark plan: every pretraining variant and stage 2 cell, resolved and hashed before any work.

Pretraining variants run once each (benchmark ``seed``) in ``OUTPUT/pretrain/<variant>-<hash>``,
the hash over the resolved config, so a config change trains a new variant and an unchanged one is
reused across cells and invocations. Cells live in ``OUTPUT/runs/<strategy>/f<fraction>_s<seed>``
and are finished once their ``DONE.json`` exists; a cell folder holding a run of another
configuration stops the benchmark (:func:`check_stale`) rather than mixing two experiments.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mosmos.benchmark.config import CHECKPOINT_PREFIX, STAGE1_VARIANTS, STRATEGY_VARIANT, BenchmarkConfig
from mosmos.config import apply_overrides, from_dict, to_dict
from mosmos.errors import ConfigError
from mosmos.export import ENCODER_JSON, ENCODER_WEIGHTS, read_encoder_export
from mosmos.finetune.config import FinetuneConfig
from mosmos.pretrain.config import PretrainConfig

__all__ = [
    "CELL_FILE",
    "DONE_FILE",
    "Cell",
    "Plan",
    "Variant",
    "cell_dirname",
    "check_stale",
    "config_hash",
    "make_plan",
    "strategy_dirname",
]

DONE_FILE = "DONE.json"
CELL_FILE = "cell.json"  # written before a cell starts: the config hash it runs with
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Variant:
    """A pretraining run shared by the cells of one or more strategies."""

    name: str  # mosmos, contrastive_only, tags_only, shuffled_tags or multidataset
    config: Any  # PretrainConfig (stage 1) or FinetuneConfig (multidataset)
    config_hash: str

    @property
    def dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def done(self) -> bool:
        """The export is complete (``encoder.json`` is written after the weights)."""
        return (self.dir / ENCODER_JSON).is_file() and (self.dir / ENCODER_WEIGHTS).is_file()


@dataclass
class Cell:
    """One stage 2 run of the grid."""

    strategy: str
    fraction: float
    seed: int
    config: Any  # FinetuneConfig
    config_hash: str
    variant: str | None  # the pretraining variant it needs

    @property
    def dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def done(self) -> bool:
        return (self.dir / DONE_FILE).is_file()


@dataclass
class Plan:
    """Every run of a benchmark, resolved and checked before any work starts."""

    variants: dict[str, Variant]
    cells: list[Cell]


def strategy_dirname(strategy: str) -> str:
    """A folder name for a strategy (``checkpoint:PATH`` -> ``checkpoint-<name>-<hash of PATH>``)."""
    if not strategy.startswith(CHECKPOINT_PREFIX):
        return strategy.replace("+", "_")
    path = strategy[len(CHECKPOINT_PREFIX) :]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path).name)[:40]
    return f"checkpoint-{stem}-{hashlib.sha256(path.encode()).hexdigest()[:6]}"


def cell_dirname(fraction: float, seed: int) -> str:
    return f"f{fraction:g}_s{seed}"


def config_hash(cfg: Any, ignore: tuple[str, ...] = ("output_dir", "data.cache_dir", "train.resume")) -> str:
    """Short hash of a resolved config, without the keys that do not change results (``ignore``)."""
    tree = to_dict(cfg)
    for key in ignore:
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    text = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def _find_file(path: str, key: str) -> Path:
    """A config path as given (relative to the working directory), else relative to the repository."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    raise ConfigError(f"{key}: {path} does not exist")


def _stage_config(cls: type, path: Path, overrides: list[str], updates: dict[str, Any], key: str) -> Any:
    """A stage config: the YAML at ``path``, the user's ``overrides`` (from ``key``), then ``updates``.

    ``updates`` (dotted keys -> values) are set as values, not parsed, so paths need no quoting.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable YAML config: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        apply_overrides(data, overrides, cls)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    for dotted, value in updates.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path} with {key}: {exc}") from None


def _check_data(path: str, key: str) -> None:
    if not Path(path).exists():
        raise ConfigError(f"{key}: {path} does not exist (a dataset folder or datalist JSON)")


def make_plan(cfg: BenchmarkConfig) -> Plan:
    """Resolve every pretraining variant and cell config; fails before any work on a bad key or path."""
    out = Path(cfg.output_dir)
    cache = cfg.data.cache_dir or str(out / "cache")
    _check_data(cfg.data.target, "data.target")
    _check_data(cfg.data.test, "data.test")
    finetune_path = _find_file(str(cfg.finetune_config), "finetune_config")

    variants: dict[str, Variant] = {}
    for name in dict.fromkeys(STRATEGY_VARIANT.get(s) for s in cfg.strategies):
        if name is None:
            continue
        if name == "multidataset":
            for i, path in enumerate(cfg.data.other_datasets):
                _check_data(path, f"data.other_datasets[{i}]")
            updates = {
                "seed": cfg.seed,
                "data.datasets": list(cfg.data.other_datasets),
                "data.fraction": 1.0,
                "model.init": "random",
                "model.attention_maps": False,
            }
            overrides = [*cfg.finetune_overrides, *cfg.multidataset_overrides]
            vcfg = _stage_config(
                FinetuneConfig, finetune_path, overrides, updates, "finetune_overrides/multidataset_overrides"
            )
        else:
            updates = {"seed": cfg.seed}
            for key, value in (
                ("data.table", cfg.data.pretrain_table),
                ("data.image_root", cfg.data.pretrain_image_root),
                ("data.ground_truth", cfg.data.pretrain_ground_truth),
            ):
                if value is not None:
                    updates[key] = value
            pretrain_path = _find_file(str(cfg.pretrain_config), "pretrain_config")
            overrides = [*cfg.pretrain_overrides, *STAGE1_VARIANTS[name]]
            vcfg = _stage_config(PretrainConfig, pretrain_path, overrides, updates, "pretrain_overrides")
        digest = config_hash(vcfg)  # not over output_dir: a moved benchmark folder still matches
        vcfg.output_dir = str(out / "pretrain" / f"{name}-{digest}")
        vcfg.data.cache_dir = cache
        vcfg.train.resume = "latest"
        variants[name] = Variant(name, vcfg, digest)

    cells: list[Cell] = []
    for strategy in cfg.strategies:
        variant = STRATEGY_VARIANT.get(strategy)
        if strategy.startswith(CHECKPOINT_PREFIX):
            init = strategy[len(CHECKPOINT_PREFIX) :]
            read_encoder_export(init)  # a missing or foreign export stops here, before any work
            init_key = init
        elif variant is None:
            init, init_key = "random", "random"
        else:
            init = str(variants[variant].dir)
            init_key = f"{variant}-{variants[variant].config_hash}"
        for fraction in cfg.fractions:
            for seed in cfg.seeds:
                run_dir = out / "runs" / strategy_dirname(strategy) / cell_dirname(fraction, seed)
                updates = {
                    "output_dir": str(run_dir),
                    "seed": seed,
                    "data.datasets": [cfg.data.target],
                    "data.fraction": fraction,
                    "data.cache_dir": cache,
                    "model.init": init,
                    "model.attention_maps": strategy == "mosmos+attention",
                    "train.resume": "latest",
                }
                ccfg = _stage_config(
                    FinetuneConfig, finetune_path, cfg.finetune_overrides, updates, "finetune_overrides"
                )
                digest = config_hash(ccfg, ("output_dir", "data.cache_dir", "train.resume", "model.init"))
                digest = hashlib.sha256(f"{digest}|{init_key}".encode()).hexdigest()[:10]
                cells.append(Cell(strategy, fraction, seed, ccfg, digest, variant))
    return Plan(variants, cells)


def check_stale(plan: Plan) -> None:
    """Fail when a cell folder holds a run of a different configuration (it would mix experiments)."""
    stale = []
    for cell in plan.cells:
        for name in (DONE_FILE, CELL_FILE):
            path = cell.dir / name
            if not path.is_file():
                continue
            try:
                recorded = json.loads(path.read_text(encoding="utf-8")).get("config_hash")
            except (OSError, json.JSONDecodeError, AttributeError):
                recorded = "unreadable"
            if recorded != cell.config_hash:
                stale.append(f"{cell.dir} ({name}: config {recorded}, now {cell.config_hash})")
            break
    if stale:
        shown = "\n  ".join(stale[:5]) + (f"\n  ... (+{len(stale) - 5} more)" if len(stale) > 5 else "")
        raise ConfigError(
            f"{len(stale)} cell folder(s) hold runs of a different configuration:\n  {shown}\n"
            "Reusing them would mix two experiments in one table: choose a new output_dir, or delete "
            "those folders to rerun them."
        )
