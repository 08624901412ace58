"""The benchmark plan: every pretraining variant and stage 2 cell, resolved and hashed before any work.

Pretraining variants run once each (benchmark ``seed``) in ``OUTPUT/pretrain/<variant>-<hash>``,
the hash over the resolved config, so a config change trains a new variant and an unchanged one is
reused across cells and invocations. Cells live in ``OUTPUT/runs/<strategy>/<budget>_s<seed>``
(partial-label cells in ``OUTPUT/runs/partial-<name>/<budget>_s<seed>``) and are finished once their
``DONE.json`` exists; a cell folder holding a run of another
configuration stops the benchmark (:func:`check_stale`) rather than mixing two experiments.

Learning curves: each cell's ``train.snapshot_steps`` are its ``curve_points`` times its step cap
(:func:`mosmos.benchmark.steps.step_cap`, :func:`mosmos.benchmark.steps.curve_steps`). Snapshots
change no result, so the key is left out of the hash (:data:`mosmos.benchmark.hashing.NEUTRAL_KEYS`):
a cell finished before curves existed still matches its config.

The config of each variant and cell is built by :mod:`mosmos.benchmark.plan_builders`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mosmos.benchmark.config import PARTIAL_PREFIX, STRATEGY_VARIANT, BenchmarkConfig
from mosmos.benchmark.plan_builders import (
    PlanInputs,
    _check_data,
    _stage_config,
    cell_config,
    cell_curve,
    cell_dirname,
    strategy_dirname,
    variant_config,
    variant_key,
)
from mosmos.errors import ConfigError
from mosmos.export_format import ENCODER_JSON, ENCODER_WEIGHTS
from mosmos.finetune.config import FinetuneConfig
from mosmos.pretrain.config import PretrainConfig

__all__ = [
    "CELL_FILE",
    "CURVE_TEST_PREFIX",
    "DONE_FILE",
    "Cell",
    "Plan",
    "Variant",
    "axis_of",
    "cell_dirname",
    "check_stale",
    "last_record",
    "make_plan",
    "strategy_dirname",
]

DONE_FILE = "DONE.json"
CELL_FILE = "cell.json"  # written before a cell starts: the config hash it runs with
CURVE_TEST_PREFIX = "test_step_"  # test_step_<k>/: a cell's test scores of its snapshot after step k
REPO_ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("mosmos")


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

    strategy: str  # an initialisation strategy, or partial:<name> (the partial-label axis)
    budget: str  # f<share> or n<count> (see BenchmarkConfig.budgets)
    seed: int
    config: Any  # FinetuneConfig
    config_hash: str
    variant: str | None  # the key of the pretraining variant it needs (Plan.variants)
    # learning-curve points: optimizer step -> its share of the step cap (config.train.snapshot_steps)
    curve: dict[int, float] = field(default_factory=dict)

    @property
    def axis(self) -> str:
        """``initialisation`` or ``partial_label``."""
        return axis_of(self.strategy)

    @property
    def fraction(self) -> float:
        return float(self.budget[1:]) if self.budget.startswith("f") else 1.0

    @property
    def dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def done(self) -> bool:
        return (self.dir / DONE_FILE).is_file()


@dataclass
class Plan:
    """Every run of a benchmark, resolved and checked before any work starts."""

    variants: dict[str, Variant]  # by key: the variant name, plus "@s<seed>" with pretrain_seeds
    cells: list[Cell]


def last_record(run_dir: Path) -> dict:
    """The last evaluation record of a run's ``metrics.json`` (stage 1 or 2), ``{}`` when it has none
    (not written yet, unreadable, or no evaluation ran)."""
    path = run_dir / "metrics.json"
    try:
        history = json.loads(path.read_text(encoding="utf-8")).get("history", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return history[-1] if isinstance(history, list) and history and isinstance(history[-1], dict) else {}


def axis_of(strategy: str) -> str:
    """The grid axis of a cell's strategy: ``partial_label`` (``partial:<name>``) or ``initialisation``."""
    return "partial_label" if strategy.startswith(PARTIAL_PREFIX) else "initialisation"


def _find_file(path: str, key: str) -> Path:
    """A config path as given (relative to the working directory), else relative to the repository."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    raise ConfigError(f"{key}: {path} does not exist")


def make_plan(cfg: BenchmarkConfig) -> Plan:
    """Resolve every pretraining variant and cell config; fails before any work on a bad key or path.

    With ``pretrain_seeds``, each stage 1 (and multidataset) variant is trained once per pretraining
    seed, and the cell of fine-tuning seed ``seeds[i]`` starts from pretraining seed
    ``pretrain_seeds[i]``.
    """
    out = Path(cfg.output_dir)
    cache = cfg.data.cache_dir or str(out / "cache")
    _check_data(cfg.data.target, "data.target")
    _check_data(cfg.data.test, "data.test")
    finetune_path = _find_file(str(cfg.finetune_config), "finetune_config")
    pretrain_path = _find_file(str(cfg.pretrain_config), "pretrain_config") if cfg.pretrain_config else None

    # every cell sees the volumes stage 1 saw (spacing, HU window, body threshold) unless the
    # fine-tuning config sets them: a pretrained encoder's export carries them; random and
    # multidataset cells get them here, so no strategy is compared at another voxel size
    pretrain_data = {
        key: value
        for key, value in (
            ("data.table", cfg.data.pretrain_table),
            ("data.image_root", cfg.data.pretrain_image_root),
            ("data.ground_truth", cfg.data.pretrain_ground_truth),
        )
        if value is not None
    }
    stage1_preprocess: dict[str, Any] = {}
    if pretrain_path is not None:
        p1 = _stage_config(
            PretrainConfig, pretrain_path, cfg.pretrain_overrides, pretrain_data, "pretrain_overrides"
        ).data
        stage1_preprocess = {
            "data.spacing": list(p1.spacing),
            "data.hu_window": list(p1.hu_window),
            "data.body_threshold_hu": p1.body_threshold_hu,
        }
    base_ft = _stage_config(
        FinetuneConfig,
        finetune_path,
        cfg.finetune_overrides,
        {"data.datasets": [cfg.data.target]},
        "finetune_overrides",
    )
    preprocess_updates = {
        k: v for k, v in stage1_preprocess.items() if getattr(base_ft.data, k.split(".")[1]) is None
    }

    pretrain_seeds: list[int | None] = list(cfg.pretrain_seeds) if cfg.pretrain_seeds is not None else [None]
    inputs = PlanInputs(
        cfg, out, cache, finetune_path, pretrain_path, pretrain_data, preprocess_updates, pretrain_seeds
    )
    variants: dict[str, Variant] = {}
    names = [n for n in dict.fromkeys(STRATEGY_VARIANT.get(s) for s in cfg.init_strategies) if n is not None]
    for name in names:
        for pseed in pretrain_seeds:
            vcfg, digest = variant_config(inputs, name, pseed)
            key = variant_key(name, pseed)
            variants[key] = Variant(name, vcfg, digest)

    def make_cell(strategy: str, init_strategy: str, budget: str, i: int, seed: int) -> Cell:
        """The cell of ``strategy`` (an initialisation, or ``partial:<name>`` started from
        ``init_strategy``) at one budget and fine-tuning seed (the ``i``-th)."""
        ccfg, digest, key = cell_config(inputs, variants, strategy, init_strategy, budget, i, seed)
        return Cell(strategy, budget, seed, ccfg, digest, key, cell_curve(cfg, ccfg, strategy, unknown))

    unknown: set[str] = set()

    cells: list[Cell] = []
    for strategy in cfg.strategies:
        for budget in cfg.budgets:
            for i, seed in enumerate(cfg.seeds):
                cells.append(make_cell(strategy, strategy, budget, i, seed))
    if cfg.partial_strategies:
        for i, path in enumerate(cfg.data.other_datasets):
            _check_data(path, f"data.other_datasets[{i}]")
    partial_cells: dict[str, Cell] = {}
    for name in cfg.partial_strategies:
        for budget in cfg.budgets:
            for i, seed in enumerate(cfg.seeds):
                cell = make_cell(f"{PARTIAL_PREFIX}{name}", cfg.partial_init, budget, i, seed)
                same = partial_cells.setdefault(cell.config_hash, cell)
                if same is not cell:
                    raise ConfigError(
                        f"partial_strategies: {same.strategy} and {cell.strategy} resolve to the same stage 2 "
                        "config (e.g. the fine-tuning config's model.name is already mo_ctrans, so masked is "
                        "task_tokens); list one of them, or tell them apart with partial_overrides"
                    )
                cells.append(cell)
    if unknown:
        logger.warning(
            "curve_points: no learning curve for %s: the fine-tuning config sets neither "
            "data.samples_per_epoch nor train.max_steps, so the step cap depends on the data",
            sorted(unknown),
        )
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
