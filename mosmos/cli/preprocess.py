"""``mosmos preprocess --config FILE [key=value ...]``: fill the preprocessing cache a run will read.

Builds the cached datasets of a pretrain or finetune config exactly as training does (stage 1: the
training and validation volumes of ``build_datasets``; stage 2: the training cases of
``cached_train_cases``; stage 2's validation cases are not cached, they are scored in their own
geometry) and gives every entry a readable file, so the run that follows starts on a full cache.

- parallel: ``--workers`` processes (default: every CPU, shared among the ranks of one machine);
- sharded: under ``accelerate launch`` / ``torchrun`` each rank fills every WORLD_SIZE-th entry from
  its RANK-th (read from the environment, no process group), so the ranks split the work;
- resumable: entries are written atomically, so after a kill a rerun skips every complete entry;
- checked: an existing entry that does not read back (truncated, empty, garbage) is reported,
  deleted and rebuilt; ``--verify`` also checksums each one.

Exit status: 0 when every entry of this rank's shard is readable, 2 otherwise.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

STAGES = ("pretrain", "finetune")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="pretrain or finetune YAML config, or a shipped config by name (pretrain/demo, finetune/default, ...)",
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, as for training, e.g. data.cache_dir=/scratch"
    )
    p.add_argument(
        "--stage",
        choices=STAGES,
        default=None,
        help="the config's stage (default: detected, by which config schema it fits)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes preprocessing volumes (default: the CPUs available, divided among the ranks "
        "of this machine; 0: in this process)",
    )
    p.add_argument("--rank", type=int, default=None, help="this process's shard (default: $RANK, else 0)")
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="number of shards (default: $WORLD_SIZE, else 1)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="checksum every existing entry (reads each whole) instead of the quick header check",
    )


def default_workers() -> int:
    """The CPUs this process may use, divided among the ranks on this machine (``LOCAL_WORLD_SIZE``)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1)
    return max(1, cpus // max(1, local))


def _stage_hint(config: str | Path, overrides: list[str]) -> str | None:
    """``pretrain`` if the config names ``data.table`` only, ``finetune`` if ``data.datasets`` only."""
    import yaml

    from mosmos.resources import resolve_config

    try:
        raw = yaml.safe_load(resolve_config(config).read_text(encoding="utf-8")) or {}
    except Exception:  # unreadable: load_config reports it
        raw = {}
    data = raw.get("data") if isinstance(raw, dict) else None
    keys = set(data) if isinstance(data, dict) else set()
    keys |= {o.split("=", 1)[0].removeprefix("data.") for o in overrides if o.startswith("data.")}
    if "table" in keys and "datasets" not in keys:
        return "pretrain"
    if "datasets" in keys and "table" not in keys:
        return "finetune"
    return None


def load_stage_config(
    config: str | Path, overrides: list[str] | None = None, stage: str | None = None
) -> tuple[str, Any]:
    """``(stage, config)``: the config loaded with the schema of ``stage``, or of the one stage it fits.

    Raises:
        ConfigError: it fits neither schema (the error of the likelier one), or both.
    """
    from mosmos.config import load_config
    from mosmos.errors import ConfigError
    from mosmos.finetune.config import FinetuneConfig
    from mosmos.pretrain.config import PretrainConfig

    classes = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}
    overrides = list(overrides or [])
    if stage is not None:
        if stage not in classes:
            raise ConfigError(f"stage {stage!r} must be one of {list(classes)}")
        return stage, load_config(classes[stage], config, overrides)
    loaded, errors = {}, {}
    for name, cls in classes.items():
        try:
            loaded[name] = load_config(cls, config, overrides)
        except ConfigError as exc:
            errors[name] = exc
    if len(loaded) == 1:
        return next(iter(loaded.items()))
    hint = _stage_hint(config, overrides)
    if hint in loaded:
        return hint, loaded[hint]
    if hint in errors:
        raise errors[hint]
    if errors and len({str(e) for e in errors.values()}) == 1:  # e.g. no such file, or a benchmark config
        raise ConfigError(f"{errors['pretrain']}\n(mosmos preprocess reads pretrain and finetune configs)")
    why = "it fits both" if loaded else "; ".join(f"as {n} config: {e}" for n, e in errors.items())
    raise ConfigError(f"{config}: cannot tell a pretrain from a finetune config ({why}); pass --stage")


def cached_datasets(cfg: Any) -> list:
    """The cached datasets a training run with ``cfg`` reads, built by the stage's own functions
    (which check the table, datasets and images first, as training does)."""
    from mosmos.finetune.config import FinetuneConfig
    from mosmos.pretrain.config import PretrainConfig
    from mosmos.vocabulary import load_vocabulary

    if isinstance(cfg, PretrainConfig):
        from mosmos.pretrain.data import build_datasets

        data = build_datasets(cfg, load_vocabulary(cfg.data.vocabulary, cfg.data.organs))
        return [data.train.cached_volumes, data.val.cached_volumes]
    if isinstance(cfg, FinetuneConfig):
        from mosmos.finetune.data import build_seg_data, load_preprocess
        from mosmos.finetune.patches import cached_train_cases

        preprocess = load_preprocess(cfg)
        data = build_seg_data(cfg, load_vocabulary(cfg.data.vocabulary))
        data.preprocess = preprocess
        return [cached_train_cases(cfg, data, Path(cfg.output_dir))]
    raise TypeError(f"fill_cache needs a PretrainConfig or a FinetuneConfig, got {type(cfg).__name__}")


def fill_cache(
    cfg: Any,
    workers: int | None = None,
    rank: int | None = None,
    world: int | None = None,
    verify: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fill the preprocessing cache of a pretrain or finetune config; this rank's shard only.

    Args:
        cfg: a :class:`~mosmos.pretrain.config.PretrainConfig` or
            :class:`~mosmos.finetune.config.FinetuneConfig`.
        workers: worker processes (default :func:`default_workers`; 0: this process).
        rank: shard index (default ``$RANK``, else 0).
        world: number of shards (default ``$WORLD_SIZE``, else 1).
        verify: checksum every existing entry.
        progress: show a progress bar (on rank 0 only).

    Returns:
        the counts of :func:`mosmos.cache.fill_entries` (``entries``, ``total``, ``present``,
        ``built``, ``rebuilt``, ``failed``, ``seconds``, ``volumes_per_s``, ...).

    Raises:
        DataError: a volume could not be preprocessed (every other entry is filled first).
    """
    from mosmos.cache import fill_entries, shard_from_env
    from mosmos.errors import DataError

    env_rank, env_world = shard_from_env()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    result = fill_entries(
        cached_datasets(cfg),
        workers=default_workers() if workers is None else workers,
        rank=rank,
        world=world,
        verify=verify,
        progress=progress and rank == 0,
    )
    if result["failed"]:
        print(format_summary(result))
        shown = "\n".join(f"  {m}" for m in result["failures"][:10])
        more = f"\n  ... and {result['failed'] - 10} more" if result["failed"] > 10 else ""
        raise DataError(f"{result['failed']} volume(s) could not be preprocessed:\n{shown}{more}")
    return result


def format_summary(r: dict[str, Any]) -> str:
    """One line: what was there, built, rebuilt and failed, in how long."""
    who = (
        f"rank {r['rank']}/{r['world']}: {r['total']} of {r['entries']}"
        if r["world"] > 1
        else f"{r['total']}"
    )
    return (
        f"preprocess {who} entries: {r['present']} already there, {r['built']} built, "
        f"{r['rebuilt']} rebuilt (corrupt), {r['failed']} failed in {r['seconds']:.1f} s "
        f"({r['volumes_per_s']:.2f} volumes/s, {r['workers']} worker(s)); cache: {', '.join(r['cache_dirs'])}"
    )


def run(args: argparse.Namespace) -> int:
    _, cfg = load_stage_config(args.config, args.overrides, args.stage)
    result = fill_cache(cfg, workers=args.workers, rank=args.rank, world=args.world_size, verify=args.verify)
    print(format_summary(result))
    return 0
