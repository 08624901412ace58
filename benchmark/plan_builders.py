"""The builders :func:`mosmos.benchmark.plan.make_plan` resolves a benchmark's runs with: the config
of each pretraining variant and of each stage 2 cell, with their hashes and folder names.

Each builder takes the :class:`PlanInputs` make_plan resolves once (paths, shared data keys, stage 1's
preprocessing) and returns configs; make_plan wraps them into its :class:`~mosmos.benchmark.plan.Variant`
and :class:`~mosmos.benchmark.plan.Cell` entries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mosmos.benchmark.config import (
    ATTENTION_SUFFIX,
    CHECKPOINT_PREFIX,
    MASK_VARIANT_RUNS,
    OBJECTIVE_VARIANT_RUNS,
    PARTIAL_PREFIX,
    PARTIAL_STRATEGIES,
    STAGE1_VARIANTS,
    STRATEGY_VARIANT,
    BenchmarkConfig,
)
from mosmos.benchmark.hashing import NEUTRAL_KEYS, config_hash
from mosmos.benchmark.steps import curve_steps, step_cap
from mosmos.config import apply_overrides, from_dict
from mosmos.errors import ConfigError
from mosmos.export import read_encoder_export
from mosmos.finetune.config import FinetuneConfig
from mosmos.pretrain.config import PretrainConfig

if TYPE_CHECKING:
    from mosmos.benchmark.plan import Variant

__all__ = [
    "PlanInputs",
    "cell_config",
    "cell_curve",
    "cell_dirname",
    "multidataset_transfer",
    "strategy_dirname",
    "variant_config",
    "variant_key",
]


@dataclass(frozen=True)
class PlanInputs:
    """What every builder of one plan shares, resolved once by :func:`~mosmos.benchmark.plan.make_plan`."""

    cfg: BenchmarkConfig
    out: Path  # the benchmark's output_dir
    cache: str  # data.cache_dir of every run
    finetune_path: Path  # finetune_config, found
    pretrain_path: Path | None  # pretrain_config, found (None: no stage 1)
    pretrain_data: dict[str, Any]  # stage 1 data keys the benchmark's data section sets
    preprocess_updates: dict[str, Any]  # stage 1's preprocessing, where the fine-tuning config sets none
    pretrain_seeds: list[int | None]  # [None]: the benchmark seed


def strategy_dirname(strategy: str) -> str:
    """A folder name for a strategy (``checkpoint:PATH`` -> ``checkpoint-<name>-<hash of PATH>``,
    ``partial:masked`` -> ``partial-masked``)."""
    if strategy.startswith(PARTIAL_PREFIX):
        return f"partial-{strategy[len(PARTIAL_PREFIX) :]}"
    if not strategy.startswith(CHECKPOINT_PREFIX):
        return strategy.replace("+", "_")
    path = strategy[len(CHECKPOINT_PREFIX) :]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path).name)[:40]
    return f"checkpoint-{stem}-{hashlib.sha256(path.encode()).hexdigest()[:6]}"


def cell_dirname(budget: str, seed: int) -> str:
    """``f0.25_s0`` (a share of the training cases) or ``n4_s0`` (four labelled cases)."""
    return f"{budget}_s{seed}"


def variant_key(name: str, pretrain_seed: int | None) -> str:
    return name if pretrain_seed is None else f"{name}@s{pretrain_seed}"


def multidataset_transfer(warmup_steps: int) -> list[str]:
    """What the cells of the ``multidataset`` strategy fine-tune with unless the benchmark's overrides
    say otherwise (``train.pretrained_overrides: [model.transfer=encoder, train.head_warmup_steps=0,
    train.rewarm_steps=0]`` is the encoder-only transfer): MultiTalent's transfer of the whole network (Ulrich et al. 2023),
    whose fresh output head and task tokens first train alone, here for the cell's learning-rate
    warm-up (``train.warmup_steps``), after which the transferred weights warm up again over as many
    steps (``train.rewarm_steps``, nnU-Net's second warm-up)."""
    return [
        "model.transfer=encoder_decoder",
        f"train.head_warmup_steps={warmup_steps}",
        f"train.rewarm_steps={warmup_steps}",
    ]


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


def variant_config(inputs: PlanInputs, name: str, pseed: int | None) -> tuple[Any, str]:
    """The config of pretraining variant ``name`` at pretraining seed ``pseed`` (None: the benchmark
    ``seed``) and its hash: a :class:`PretrainConfig`, or for ``multidataset`` a :class:`FinetuneConfig`."""
    cfg, out, cache = inputs.cfg, inputs.out, inputs.cache
    finetune_path, pretrain_path = inputs.finetune_path, inputs.pretrain_path
    pretrain_data, preprocess_updates = inputs.pretrain_data, inputs.preprocess_updates
    variant_seed = cfg.seed if pseed is None else pseed
    if name == "multidataset":
        for i, path in enumerate(cfg.data.other_datasets):
            _check_data(path, f"data.other_datasets[{i}]")
        updates = {
            "seed": variant_seed,
            "data.datasets": list(cfg.data.other_datasets),
            "data.fraction": 1.0,
            "model.init": "random",
            "model.attention_maps": False,
            **preprocess_updates,
        }
        overrides = [*cfg.finetune_overrides, *cfg.multidataset_overrides]
        vcfg = _stage_config(
            FinetuneConfig,
            finetune_path,
            overrides,
            updates,
            "finetune_overrides/multidataset_overrides",
        )
    else:
        updates = {"seed": variant_seed, **pretrain_data}
        overrides = [*cfg.pretrain_overrides, *STAGE1_VARIANTS[name]]
        if name in OBJECTIVE_VARIANT_RUNS:
            overrides.append(f"train.variants=[{','.join(cfg.objective_variants)}]")
        if name in MASK_VARIANT_RUNS:
            updates["data.mask_datasets"] = list(cfg.data.mask_datasets or cfg.data.other_datasets)
        vcfg = _stage_config(PretrainConfig, pretrain_path, overrides, updates, "pretrain_overrides")
    digest = config_hash(vcfg)  # not over output_dir: a moved benchmark folder still matches
    vcfg.output_dir = str(out / "pretrain" / f"{name}-{digest}")
    vcfg.data.cache_dir = cache
    vcfg.train.resume = "latest"
    return vcfg, digest


def cell_config(
    inputs: PlanInputs,
    variants: dict[str, Variant],
    strategy: str,
    init_strategy: str,
    budget: str,
    i: int,
    seed: int,
) -> tuple[FinetuneConfig, str, str | None]:
    """The config of the cell of ``strategy`` (an initialisation, or ``partial:<name>`` started from
    ``init_strategy``) at one budget and fine-tuning seed (the ``i``-th), its hash and the key of the
    pretraining variant it needs (None: none)."""
    cfg, out, cache, finetune_path = inputs.cfg, inputs.out, inputs.cache, inputs.finetune_path
    preprocess_updates, pretrain_seeds = inputs.preprocess_updates, inputs.pretrain_seeds
    partial = strategy[len(PARTIAL_PREFIX) :] if strategy.startswith(PARTIAL_PREFIX) else None
    name = STRATEGY_VARIANT.get(init_strategy)
    key = None if name is None else variant_key(name, pretrain_seeds[i % len(pretrain_seeds)])
    if init_strategy.startswith(CHECKPOINT_PREFIX):
        init = init_strategy[len(CHECKPOINT_PREFIX) :]
        read_encoder_export(init)  # a missing or foreign export stops here, before any work
        init_key = init
    elif key is None:
        init, init_key = "random", "random"
    else:
        init = str(variants[key].dir)
        init_key = f"{key}-{variants[key].config_hash}"
    run_dir = out / "runs" / strategy_dirname(strategy) / cell_dirname(budget, seed)
    updates = {
        "output_dir": str(run_dir),
        "seed": seed,
        "data.datasets": [cfg.data.target],
        "data.fraction": float(budget[1:]) if budget.startswith("f") else 1.0,
        "data.max_train_cases": int(budget[1:]) if budget.startswith("n") else None,
        "data.cache_dir": cache,
        "model.init": init,
        "model.attention_maps": init_strategy.endswith(ATTENTION_SUFFIX),
        "train.resume": "latest",
        "train.early_stopping_patience": cfg.train.early_stopping_patience,
        **(preprocess_updates if init == "random" or name == "multidataset" else {}),
    }
    recipe = cfg.train.random_overrides if init == "random" else cfg.train.pretrained_overrides
    overrides = [*cfg.finetune_overrides, *recipe]
    key_names = "finetune_overrides/train.pretrained_overrides/train.random_overrides"
    if partial is not None:
        # one model on the target and every other dataset; the label budget subsets the target only
        updates["data.datasets"] = [cfg.data.target, *cfg.data.other_datasets]
        updates["data.subset_datasets"] = [cfg.data.target]
        overrides += [*PARTIAL_STRATEGIES[partial], *cfg.partial_overrides.get(partial, [])]
        key_names += "/partial_overrides"
    ccfg = _stage_config(FinetuneConfig, finetune_path, overrides, updates, key_names)
    if name == "multidataset" and ccfg.train.strategy != "mutual":  # mutual: encoder transfer only
        overrides = [*multidataset_transfer(ccfg.train.warmup_steps), *overrides]  # the user's win
        ccfg = _stage_config(FinetuneConfig, finetune_path, overrides, updates, key_names)
        source = variants[key].config.model  # type: ignore[index]
        if ccfg.model.transfer == "encoder_decoder" and source.name != ccfg.model.name:
            raise ConfigError(
                f"the multidataset strategy transfers the whole network (model.transfer=encoder_decoder), "
                f"but its pretraining builds {source.name!r} and the cells {ccfg.model.name!r}: use the same "
                "model.name, or train.pretrained_overrides=[model.transfer=encoder] for the encoder only"
            )
    digest = config_hash(ccfg, (*NEUTRAL_KEYS, "model.init"))
    digest = hashlib.sha256(f"{digest}|{init_key}".encode()).hexdigest()[:10]
    return ccfg, digest, key


def cell_curve(
    cfg: BenchmarkConfig, ccfg: FinetuneConfig, strategy: str, unknown: set[str]
) -> dict[int, float]:
    """The cell's learning-curve steps, set as its ``train.snapshot_steps`` (``strategy`` is added to
    ``unknown`` when its step cap depends on the data)."""
    cap = step_cap(ccfg)
    if not cfg.curve_points or ccfg.train.strategy == "mutual":
        # mutual learning trains two stages of model cohorts, each its own engine run: no one
        # step count a share could name, so its cells have no curve
        curve = {}
    elif cap is None:
        unknown.add(strategy)
        curve = {}
    else:
        curve = curve_steps(cap, cfg.curve_points)
    ccfg.train.snapshot_steps = sorted(curve)
    return curve
