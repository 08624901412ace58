"""``mosmos benchmark --config FILE``: initialisation strategy × label fraction × seed, on one target.

Each cell of the grid is a stage 2 run on ``data.target`` with a share ``fraction`` of its training
cases, seeded by ``seed``, its encoder initialised by ``strategy``; the best weights by validation
Dice are then scored on the labelled ``data.test`` (only the organs the target labels). Every cell
trains the same fixed budget (``train.epochs`` of the fine-tuning config): there is no early
stopping, and the summary says so.

Strategies (see :data:`STRATEGIES`):

* ``random``: no pretraining.
* ``mosmos``: stage 1 as configured (contrastive + tags); ``mosmos+attention`` uses the same
  encoder and also feeds its pixel-tag attention maps to the decoder.
* ``contrastive_only`` / ``tags_only``: stage 1 with the tag terms / the contrastive term off.
* ``shuffled_tags``: the same stage 1 with every scan paired with another scan's report: the same
  compute without the true pairing (the control a report-supervision gain must beat).
* ``multidataset``: supervised stage 2 pretraining on ``data.other_datasets``; its encoder is
  exported in the stage 1 format and initialises the target run.
* ``checkpoint:PATH``: any encoder a user brings (a stage 1 run directory or encoder.safetensors).

Pretraining variants run once each (benchmark ``seed``) in ``OUTPUT/pretrain/<variant>-<hash>``,
the hash over the resolved config, so a config change trains a new variant and an unchanged one is
reused across cells and invocations. Cells live in ``OUTPUT/runs/<strategy>/f<fraction>_s<seed>``
and are finished once their ``DONE.json`` exists; every run resumes (``train.resume=latest``), so a
second call skips finished work and continues unfinished work. The report (``results.csv``,
``cases.csv``, ``summary.md``, plots) is regenerated from the finished cells at the end of every call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mosmos.config import apply_overrides, dump_config, from_dict, load_config, to_dict
from mosmos.errors import ConfigError, DataError, MosmosError
from mosmos.finetune.config import SlidingWindowEval
from mosmos.io import atomic_path, atomic_write_text, library_versions, write_json

logger = logging.getLogger("mosmos")

__all__ = [
    "STRATEGIES",
    "BenchmarkConfig",
    "Cell",
    "Plan",
    "Variant",
    "export_segmenter_encoder",
    "main",
    "make_plan",
    "run_benchmark",
    "run_variant",
    "train_and_evaluate",
]

CHECKPOINT_PREFIX = "checkpoint:"
#: Stage 1 overrides of each pretraining variant, applied after ``pretrain_overrides``.
STAGE1_VARIANTS: dict[str, list[str]] = {
    "mosmos": [],
    # the encoder learns through the image embedding here, whatever share the base config lets through
    "contrastive_only": [
        "train.tag_weight=0",
        "train.embedding_tag_weight=0",
        "train.pooled_tag_weight=0",
        "train.image_embedding_grad=1",
    ],
    "tags_only": ["train.contrastive_weight=0", "train.embedding_tag_weight=0"],
    "shuffled_tags": ["data.shuffle_reports=true"],
}
#: Strategy -> the pretraining variant whose encoder initialises it (None: no pretraining).
STRATEGY_VARIANT: dict[str, str | None] = {
    "random": None,
    "mosmos": "mosmos",
    "contrastive_only": "contrastive_only",
    "tags_only": "tags_only",
    "mosmos+attention": "mosmos",
    "multidataset": "multidataset",
    "shuffled_tags": "shuffled_tags",
}
STRATEGIES = tuple(STRATEGY_VARIANT)
DONE_FILE = "DONE.json"
CELL_FILE = "cell.json"  # written before a cell starts: the config hash it runs with
ENCODER_JSON = "encoder.json"
ENCODER_FILE = "encoder.safetensors"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BenchmarkData:
    target: str = ""  # the fine-tuning target: one dataset folder (nnU-Net / MSD) or datalist JSON
    test: str = ""  # labelled dataset scored after each cell (only the organs the target labels)
    pretrain_table: str | None = None  # stage 1 report table (null: the stage 1 config's data.table)
    pretrain_image_root: str | None = None  # stage 1 image folder (null: the stage 1 config's)
    pretrain_ground_truth: str | None = None  # synthetic ground truth for the pointing game (optional)
    other_datasets: list[str] = field(default_factory=list)  # multidataset: supervised pretraining data
    cache_dir: str | None = None  # preprocessed-volume cache of every run (default: OUTPUT_DIR/cache)


@dataclass
class BenchmarkTrain:
    # evaluations without improvement before a cell stops; only null (a fixed budget) is supported:
    # every cell trains the fine-tuning config's train.epochs and is scored at its best validation
    early_stopping_patience: int | None = None

    def validate(self) -> None:
        if self.early_stopping_patience is not None:
            raise ConfigError(
                f"train.early_stopping_patience={self.early_stopping_patience}: early stopping is not "
                "available yet; set it to null: every cell then trains the same fixed budget (the "
                "fine-tuning config's train.epochs) and is scored with its best-validation weights"
            )


@dataclass
class BenchmarkEval(SlidingWindowEval):
    """Test-set inference of every cell (``overlap``, ``sw_batch_size`` as in stage 2)."""

    device: str | None = None  # cpu, cuda, cuda:1 ... (default: cuda when available)


@dataclass
class BenchmarkConfig:
    output_dir: str = "runs/benchmark"  # the benchmark folder (pretrain/, runs/, report)
    seed: int = 0  # seed of the pretraining variants (each cell uses its own from `seeds`)
    data: BenchmarkData = field(default_factory=BenchmarkData)
    # initialisation strategies: random, mosmos, contrastive_only, tags_only, mosmos+attention,
    # multidataset, shuffled_tags, checkpoint:PATH
    strategies: list[str] = field(default_factory=lambda: ["random", "mosmos", "shuffled_tags"])
    fractions: list[float] = field(default_factory=lambda: [0.25, 1.0])  # shares of target training cases
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # fine-tuning seeds (and case subsets)
    pretrain_config: str | None = None  # stage 1 YAML of the pretraining variants
    pretrain_overrides: list[str] = field(default_factory=list)  # dotted overrides of it
    finetune_config: str | None = None  # stage 2 YAML of every cell (and of multidataset pretraining)
    finetune_overrides: list[str] = field(default_factory=list)  # dotted overrides of it
    multidataset_overrides: list[str] = field(default_factory=list)  # extra ones for multidataset only
    train: BenchmarkTrain = field(default_factory=BenchmarkTrain)
    eval: BenchmarkEval = field(default_factory=BenchmarkEval)

    def validate(self) -> None:
        if not self.strategies:
            raise ConfigError("strategies: at least one is needed, e.g. [random, mosmos, shuffled_tags]")
        for name in self.strategies:
            if name.startswith(CHECKPOINT_PREFIX):
                if not name[len(CHECKPOINT_PREFIX) :].strip():
                    raise ConfigError(f"strategies: {name!r} needs a path, e.g. checkpoint:runs/pretrain")
            elif name not in STRATEGY_VARIANT:
                raise ConfigError(
                    f"strategies: unknown strategy {name!r}; valid: {[*STRATEGIES, 'checkpoint:PATH']}"
                )
        for key, values in (("strategies", self.strategies), ("fractions", self.fractions)):
            if len(set(values)) != len(values):
                raise ConfigError(f"{key}: {values} lists a value twice")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: {self.seeds} lists a value twice")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"fractions={self.fractions}: give one or more shares in (0, 1]")
        if not self.seeds:
            raise ConfigError("seeds: at least one fine-tuning seed is needed, e.g. [0, 1, 2]")
        if not self.data.target:
            raise ConfigError("data.target is required: the dataset folder or datalist to fine-tune on")
        if not self.data.test:
            raise ConfigError("data.test is required: a labelled dataset folder or datalist to score on")
        if not self.finetune_config:
            raise ConfigError("finetune_config is required: a stage 2 YAML, e.g. configs/finetune/demo.yaml")
        variants = {STRATEGY_VARIANT.get(s) for s in self.strategies}
        if variants & set(STAGE1_VARIANTS) and not self.pretrain_config:
            raise ConfigError(
                "pretrain_config is required by the stage 1 strategies "
                f"{[s for s in self.strategies if STRATEGY_VARIANT.get(s) in STAGE1_VARIANTS]}"
            )
        if "multidataset" in variants and not self.data.other_datasets:
            raise ConfigError("data.other_datasets is required by the multidataset strategy")


# ----------------------------------------------------------------------------------------- the plan
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
        return (self.dir / ENCODER_JSON).is_file() and (self.dir / ENCODER_FILE).is_file()


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
    from mosmos.finetune.config import FinetuneConfig
    from mosmos.finetune.pretrained import read_encoder_export
    from mosmos.pretrain.config import PretrainConfig

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


# ------------------------------------------------------------------------------------ running work
def export_segmenter_encoder(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export a stage 2 run's encoder in the stage 1 format, so ``model.init=PATH`` loads it.

    Writes ``encoder.safetensors`` (``encoder.<name>`` tensors from the segmenter's ``encoder.*``
    weights) and then ``encoder.json`` (``mosmos-encoder-v1``: architecture, kwargs, feature
    channels and strides, the run's preprocessing; no organs, no tag attention head).

    Args:
        run_dir: a stage 2 run directory (``model.safetensors`` + ``model.json``).
        out_dir: where the export goes (default: ``run_dir``).

    Returns:
        The folder holding the export.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from mosmos.finetune.inference import MODEL_FILE, SPEC_FILE
    from mosmos.finetune.pretrained import EXPORT_FORMAT
    from mosmos.models.registry import create_image_encoder

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    try:
        spec = json.loads((run_dir / SPEC_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(run_dir / MODEL_FILE))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise DataError(f"{run_dir}: cannot read the stage 2 model to export its encoder: {exc}") from None
    encoder = {k: v.contiguous() for k, v in tensors.items() if k.startswith("encoder.")}
    if not encoder:
        raise DataError(f"{run_dir / MODEL_FILE}: no encoder.* weights to export")
    image_encoder = create_image_encoder(spec["encoder"], **spec["encoder_kwargs"])
    pre = spec.get("preprocess", {})
    with atomic_path(out_dir / ENCODER_FILE) as tmp:
        save_file(encoder, str(tmp), metadata={"format": EXPORT_FORMAT})
    write_json(
        out_dir / ENCODER_JSON,
        {
            "format": EXPORT_FORMAT,
            "architecture": spec["encoder"],
            "encoder_kwargs": spec["encoder_kwargs"],
            "feature_channels": list(image_encoder.feature_channels),
            "feature_strides": list(image_encoder.feature_strides),
            "preprocess": {
                "spacing": pre.get("spacing"),
                "size": pre.get("size"),
                "hu_window": pre.get("hu_window"),
                "body_threshold_hu": pre.get("body_threshold_hu"),
                "orientation": "RAS",
            },
            "organs": [],
            "tag_attention": None,
            "objective": {"supervised": "multidataset", "datasets": [t["name"] for t in spec["tasks"]]},
        },
    )
    return out_dir


def run_variant(variant: Variant) -> None:
    """Train one pretraining variant (resuming a crashed attempt) and export its encoder."""
    if variant.name == "multidataset":
        from mosmos.finetune.train import run as run_finetune

        if run_finetune(variant.config):
            export_segmenter_encoder(variant.dir)
    else:
        from mosmos.pretrain.train import run as run_pretrain

        run_pretrain(variant.config)


def _last_record(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    try:
        history = json.loads(path.read_text(encoding="utf-8")).get("history", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return history[-1] if history else {}


def train_and_evaluate(cell: Cell, cfg: BenchmarkConfig) -> dict:
    """Train one cell (resuming), score its best-validation weights on ``data.test``.

    Returns:
        What ``DONE.json`` records besides the cell's identity: timing, steps, best epoch.

    Raises:
        KeyboardInterrupt: when the training was interrupted (it saved a checkpoint to resume from).
    """
    from mosmos.finetune.evaluate import evaluate_run
    from mosmos.finetune.train import BEST_FILE
    from mosmos.finetune.train import run as run_finetune

    resumed = (cell.dir / "checkpoints").is_dir()
    t0 = time.time()
    best = run_finetune(cell.config)
    train_seconds = time.time() - t0
    if not best:
        print(f"benchmark: {cell.dir}: training interrupted; run the benchmark again to resume")
        raise KeyboardInterrupt
    t1 = time.time()
    evaluate_run(
        cell.dir,
        cfg.data.test,
        cell.dir / "test",
        device=cfg.eval.device,
        overlap=cfg.eval.overlap,
        sw_batch_size=cfg.eval.sw_batch_size,
    )
    last = _last_record(cell.dir)
    best_json = json.loads((cell.dir / BEST_FILE).read_text(encoding="utf-8"))
    return {
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(time.time() - t1, 2),
        "resumed": resumed,
        "steps": last.get("step"),
        "best_epoch": best_json.get("epoch"),
        "best_val_mean_dice": best_json.get("mean_dice"),
    }


def _ensure_variant(variant: Variant) -> None:
    if variant.done:
        return
    print(f"benchmark: pretraining variant {variant.name} in {variant.dir}")
    run_variant(variant)
    if not variant.done:
        print(f"benchmark: {variant.dir}: pretraining stopped before its export; run again to resume")
        raise KeyboardInterrupt


def _run_cell(cell: Cell, cfg: BenchmarkConfig) -> None:
    write_json(cell.dir / CELL_FILE, {"config_hash": cell.config_hash})
    record = train_and_evaluate(cell, cfg)
    write_json(
        cell.dir / DONE_FILE,
        {
            "strategy": cell.strategy,
            "fraction": cell.fraction,
            "seed": cell.seed,
            "init": cell.config.model.init,
            "attention_maps": cell.config.model.attention_maps,
            "config_hash": cell.config_hash,
            **record,
        },
    )


def run_benchmark(cfg: BenchmarkConfig) -> Path:
    """Run (or continue) the grid and write the report.

    Returns:
        The path of ``summary.md``.
    """
    from tqdm.auto import tqdm

    from mosmos.benchmark.report import write_report

    plan = make_plan(cfg)
    check_stale(plan)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    write_json(out / "versions.json", library_versions())
    todo = [cell for cell in plan.cells if not cell.done]
    print(
        f"benchmark: {len(plan.cells)} cells ({len(cfg.strategies)} strategies x {len(cfg.fractions)} "
        f"fractions x {len(cfg.seeds)} seeds), {len(plan.cells) - len(todo)} finished, {len(todo)} to run"
    )
    try:
        for name in dict.fromkeys(cell.variant for cell in todo if cell.variant):
            _ensure_variant(plan.variants[name])
        bar = tqdm(total=len(plan.cells), initial=len(plan.cells) - len(todo), desc="benchmark", unit="cell")
        try:
            for cell in todo:
                bar.set_postfix_str(f"{cell.strategy} f={cell.fraction:g} s={cell.seed}")
                _run_cell(cell, cfg)
                bar.update(1)
        finally:
            bar.close()
    except BaseException:  # an error or Ctrl-C: report what finished, then let it propagate
        if any(cell.done for cell in plan.cells):
            try:
                write_report(cfg, plan)
            except (MosmosError, OSError, ValueError) as exc:
                logger.warning("could not update the benchmark report: %s", exc)
        raise
    summary = write_report(cfg, plan)
    print(f"benchmark finished: {summary}")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/benchmark/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seeds=[0,1] fractions=[0.5]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mosmos benchmark", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = load_config(BenchmarkConfig, args.config, args.overrides)
    run_benchmark(cfg)
    return 0
