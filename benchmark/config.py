"""The benchmark config: target and test data, the strategy x fraction x seed grid, the stage configs.

Strategies (see :data:`STRATEGIES`):

* ``random``: no pretraining.
* ``mosmos``: stage 1 with the paper's objective (contrastive + organ tags through pixel-tag
  attention, both training the image encoder: ``train.variants=[]``, whatever the stage 1 config
  lists); ``mosmos+attention`` uses the same encoder and also feeds its pixel-tag attention maps to
  the decoder.
* ``mosmos_variant``: the paper's objective with the departures named in ``objective_variants``
  (e.g. ``[lit, pooled_tags]``), reported beside ``mosmos``; ``shuffled_variant`` is its control.
* ``contrastive_only`` / ``tags_only``: stage 1 with the tag terms / the contrastive term off.
* ``shuffled_tags``: the ``mosmos`` stage 1 with every scan paired with another scan's report: the
  same compute without the true pairing (the control a report-supervision gain must beat).
* ``mosmos+masks``: the ``mosmos`` stage 1 with the labelled scans of ``data.mask_datasets`` (default:
  ``data.other_datasets``) also supervising each organ's attention map (stage 1's
  ``data.mask_datasets``; see docs/stage1-pretrain.md). ``mosmos_variant+masks`` is the same on the
  ``mosmos_variant`` objective (the departures in ``objective_variants``); ``shuffled_variant+masks``
  is its control (the same masks, every scan paired with another scan's report).
* ``<strategy>+attention`` (``mosmos+attention``, ``mosmos_variant+attention``,
  ``mosmos+masks+attention``, ``mosmos_variant+masks+attention``, ``shuffled_variant+masks+attention``):
  the encoder of ``<strategy>`` with its pixel-tag attention maps also fed to the decoder (the
  paper's transfer route).
* ``multidataset``: supervised stage 2 pretraining on ``data.other_datasets``, transferred as
  MultiTalent does: encoder and decoder (``model.transfer: encoder_decoder``), the new head warmed
  up alone first (``train.head_warmup_steps``); its encoder is also exported in the stage 1 format.
* ``checkpoint:PATH``: any encoder a user brings (a stage 1 run directory or encoder.safetensors).

Partial-label strategies (the second axis, see :data:`PARTIAL_STRATEGIES`), each at one fixed
initialisation (``partial_init``): one stage 2 model trained on ``data.target`` (at the label budget)
together with the whole of every ``data.other_datasets``, with

* ``masked``: BCE + soft Dice on the organs each sample's dataset labels, averaged per organ;
* ``multitalent``: BCE + batch Dice on the valid channels, summed over channels (Ulrich et al. 2023);
* ``marginal``: softmax with the unlabelled organs merged into background (Shi et al. 2021);
* ``task_tokens``: the masked loss on MO-CTranS, a learned task token per dataset (``model.name=mo_ctrans``);
* ``mutual``: deep mutual learning, two stages of model cohorts (Liu et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mosmos.errors import ConfigError
from mosmos.finetune.config import SlidingWindowEval

__all__ = [
    "CHECKPOINT_PREFIX",
    "MASK_VARIANT_RUNS",
    "OBJECTIVE_VARIANT_RUNS",
    "PARTIAL_PREFIX",
    "PARTIAL_STRATEGIES",
    "STAGE1_VARIANTS",
    "STRATEGIES",
    "STRATEGY_VARIANT",
    "BenchmarkConfig",
    "BenchmarkData",
    "BenchmarkEval",
    "BenchmarkTrain",
    "budget_label",
]

CHECKPOINT_PREFIX = "checkpoint:"
#: Stage 1 overrides of each pretraining variant, applied after ``pretrain_overrides``.
STAGE1_VARIANTS: dict[str, list[str]] = {
    "mosmos": ["train.variants=[]"],
    "mosmos_variant": [],  # train.variants is set from BenchmarkConfig.objective_variants
    # the ablations and the control start from the paper's objective, whatever the stage 1 config lists
    "contrastive_only": [
        "train.tag_weight=0",
        "train.variants=[]",
    ],
    "tags_only": ["train.variants=[]", "train.contrastive_weight=0"],
    "shuffled_tags": ["train.variants=[]", "data.shuffle_reports=true"],
    "shuffled_variant": ["data.shuffle_reports=true"],  # and train.variants as mosmos_variant
    "mosmos_masks": ["train.variants=[]"],  # and data.mask_datasets from BenchmarkConfig (plan.py)
    "mosmos_variant_masks": [],  # train.variants as mosmos_variant, data.mask_datasets as mosmos_masks
    # the control of mosmos_variant_masks: the same masks, reports shuffled across scans
    "shuffled_variant_masks": ["data.shuffle_reports=true"],
}
#: Stage 1 variants whose train.variants is BenchmarkConfig.objective_variants.
OBJECTIVE_VARIANT_RUNS = (
    "mosmos_variant",
    "shuffled_variant",
    "mosmos_variant_masks",
    "shuffled_variant_masks",
)
#: Stage 1 variants that mix the labelled scans of BenchmarkConfig.data.mask_datasets into stage 1.
MASK_VARIANT_RUNS = ("mosmos_masks", "mosmos_variant_masks", "shuffled_variant_masks")
#: Strategy -> the pretraining variant whose encoder initialises it (None: no pretraining).
STRATEGY_VARIANT: dict[str, str | None] = {
    "random": None,
    "mosmos": "mosmos",
    "mosmos_variant": "mosmos_variant",
    "contrastive_only": "contrastive_only",
    "tags_only": "tags_only",
    "mosmos+attention": "mosmos",
    "multidataset": "multidataset",
    "shuffled_tags": "shuffled_tags",
    "shuffled_variant": "shuffled_variant",
    "mosmos+masks": "mosmos_masks",
    "mosmos_variant+masks": "mosmos_variant_masks",
    "shuffled_variant+masks": "shuffled_variant_masks",
    # the same encoders with their pixel-tag attention maps also fed to the decoder
    "mosmos_variant+attention": "mosmos_variant",
    "mosmos+masks+attention": "mosmos_masks",
    "mosmos_variant+masks+attention": "mosmos_variant_masks",
    "shuffled_variant+masks+attention": "shuffled_variant_masks",
}
#: Strategies whose cells feed the stage 1 pixel-tag attention maps to the decoder.
ATTENTION_SUFFIX = "+attention"
STRATEGIES = tuple(STRATEGY_VARIANT)

#: Cells of the partial-label axis are reported as ``partial:<name>`` (results.csv, cases.csv, summary).
PARTIAL_PREFIX = "partial:"
#: Partial-label strategy -> its stage 2 overrides, applied after the fine-tuning config, its
#: ``finetune_overrides`` and the initialisation's recipe, before ``partial_overrides[name]``.
#: Every one but task_tokens keeps the fine-tuning config's network; neither MO-CTranS nor mutual
#: learning has deep-supervision outputs.
PARTIAL_STRATEGIES: dict[str, list[str]] = {
    "masked": ["train.strategy=masked"],
    "multitalent": ["train.strategy=multitalent"],
    "marginal": ["train.strategy=marginal"],
    "task_tokens": ["model.name=mo_ctrans", "train.strategy=masked", "train.deep_supervision=false"],
    "mutual": ["train.strategy=mutual", "train.deep_supervision=false"],
}


def budget_label(budget: str) -> str:
    """``n4`` -> ``4 labelled cases``, ``f0.25`` -> ``fraction 0.25``."""
    if budget.startswith("n"):
        n = int(budget[1:])
        return f"{n} labelled case{'s' if n != 1 else ''}"
    return f"fraction {budget[1:]}"


@dataclass
class BenchmarkData:
    target: str = ""  # the fine-tuning target: one dataset folder (nnU-Net / MSD) or datalist JSON
    test: str = ""  # labelled dataset scored after each cell (only the organs the target labels)
    pretrain_table: str | None = None  # stage 1 report table (null: the stage 1 config's data.table)
    pretrain_image_root: str | None = None  # stage 1 image folder (null: the stage 1 config's)
    pretrain_ground_truth: str | None = None  # synthetic ground truth for the pointing game (optional)
    # multidataset: its supervised pretraining data; partial_strategies: trained whole beside the target
    other_datasets: list[str] = field(default_factory=list)
    # mosmos+masks: the segmentation datasets whose labelled scans supervise stage 1's attention maps
    # (null: data.other_datasets)
    mask_datasets: list[str] | None = None
    cache_dir: str | None = None  # preprocessed-volume cache of every run (default: OUTPUT_DIR/cache)


@dataclass
class BenchmarkTrain:
    # validation evaluations without improvement of the mean Dice before a cell stops (the fine-tuning
    # config's train.epochs / max_steps is then the cap); null: every cell trains the whole budget.
    # Every cell is scored with its best-validation weights either way.
    early_stopping_patience: int | None = None
    # dotted fine-tuning overrides of the cells that start from a pretrained encoder (the transfer
    # recipe every pretrained strategy shares, e.g. [train.freeze_encoder_steps=50,
    # train.encoder_lr_scale=0.3]), and of the random-initialisation cells (their own best recipe)
    pretrained_overrides: list[str] = field(default_factory=list)
    random_overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError(
                f"train.early_stopping_patience={self.early_stopping_patience} must be >= 1 or null"
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
    # mosmos+masks, mosmos_variant, mosmos_variant+masks, shuffled_variant, shuffled_variant+masks,
    # multidataset, shuffled_tags, any of these with masks followed by +attention, checkpoint:PATH
    strategies: list[str] = field(default_factory=lambda: ["random", "mosmos", "shuffled_tags"])
    fractions: list[float] = field(default_factory=lambda: [0.25, 1.0])  # shares of target training cases
    # numbers of labelled target training cases (nested, seeded subsets; e.g. [1, 2, 4, 8]): a label
    # budget axis beside (or instead of) fractions
    label_cases: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # fine-tuning seeds (and case subsets)
    # pretraining seeds, one per fine-tuning seed (cell seed i uses pretraining seed i, so a seed
    # resamples both); null: one pretraining run per variant, with `seed`
    pretrain_seeds: list[int] | None = None
    pretrain_config: str | None = None  # stage 1 YAML of the pretraining variants
    pretrain_overrides: list[str] = field(default_factory=list)  # dotted overrides of it
    # the departures from the paper's objective of the mosmos_variant strategy (train.variants of
    # stage 1, see mosmos.pretrain.config.OBJECTIVE_VARIANTS)
    objective_variants: list[str] = field(default_factory=list)
    finetune_config: str | None = None  # stage 2 YAML of every cell (and of multidataset pretraining)
    finetune_overrides: list[str] = field(default_factory=list)  # dotted overrides of it
    multidataset_overrides: list[str] = field(default_factory=list)  # extra ones for multidataset only
    # partial-label strategies, each a second-axis cell trained on data.target plus data.other_datasets
    # at partial_init: masked, multitalent, marginal, task_tokens, mutual (the first is the baseline
    # of the paired comparisons); empty: no partial-label axis
    partial_strategies: list[str] = field(default_factory=list)
    # the initialisation of every partial-label cell: random, checkpoint:PATH or any strategy above
    # (its pretraining variant is shared with the initialisation axis)
    partial_init: str = "random"
    # extra dotted stage 2 overrides per partial-label strategy, e.g. {mutual: [train.mutual.final=ensemble]}
    partial_overrides: dict[str, list[str]] = field(default_factory=dict)

    # learning curves: shares of each cell's step cap (train.max_steps, else train.epochs x full batches
    # of data.samples_per_epoch) at which its weights are saved and scored on the test set
    # (OUTPUT/curves.csv, dice_vs_steps.png); the cell's own score (best-validation weights) is the
    # last point. Empty: no curves (each point costs one test-set evaluation)
    curve_points: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5])

    train: BenchmarkTrain = field(default_factory=BenchmarkTrain)
    eval: BenchmarkEval = field(default_factory=BenchmarkEval)

    @property
    def init_strategies(self) -> list[str]:
        """The initialisations the plan trains from: ``strategies``, plus ``partial_init`` when the
        partial-label axis is on."""
        extra = [self.partial_init] if self.partial_strategies else []
        return list(dict.fromkeys([*self.strategies, *extra]))

    @property
    def budgets(self) -> list[str]:
        """The label budgets, smallest first: ``n<count>`` for label_cases, then ``f<share>``."""
        return [f"n{n}" for n in sorted(self.label_cases)] + [f"f{f:g}" for f in sorted(self.fractions)]

    def validate(self) -> None:
        if not self.strategies and not self.partial_strategies:
            raise ConfigError(
                "strategies and partial_strategies are both empty: at least one strategy is needed, "
                "e.g. strategies=[random, mosmos, shuffled_tags]"
            )
        for name in self.strategies:
            _check_init(name, "strategies")
        self._validate_partial()
        for key, values in (
            ("strategies", self.strategies),
            ("partial_strategies", self.partial_strategies),
            ("fractions", self.fractions),
            ("label_cases", self.label_cases),
            ("curve_points", self.curve_points),
        ):
            if len(set(values)) != len(values):
                raise ConfigError(f"{key}: {values} lists a value twice")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: {self.seeds} lists a value twice")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"fractions={self.fractions}: shares must be in (0, 1]")
        if any(not 0 < p < 1 for p in self.curve_points):
            raise ConfigError(
                f"curve_points={self.curve_points}: shares of the step cap must be in (0, 1) (the cell's "
                "own score is the last point), e.g. [0.125, 0.25, 0.5], or [] for no learning curves"
            )
        if any(n < 1 for n in self.label_cases):
            raise ConfigError(f"label_cases={self.label_cases}: counts of labelled cases must be >= 1")
        if not self.fractions and not self.label_cases:
            raise ConfigError("fractions and label_cases are both empty: give at least one label budget")
        if self.pretrain_seeds is not None and len(self.pretrain_seeds) != len(self.seeds):
            raise ConfigError(
                f"pretrain_seeds={self.pretrain_seeds} must give one pretraining seed per fine-tuning seed "
                f"(seeds={self.seeds}), or be null"
            )
        if not self.seeds:
            raise ConfigError("seeds: at least one fine-tuning seed is needed, e.g. [0, 1, 2]")
        if not self.data.target:
            raise ConfigError("data.target is required: the dataset folder or datalist to fine-tune on")
        if not self.data.test:
            raise ConfigError("data.test is required: a labelled dataset folder or datalist to score on")
        if not self.finetune_config:
            raise ConfigError("finetune_config is required: a stage 2 YAML, e.g. configs/finetune/demo.yaml")
        inits = self.init_strategies
        variants = {STRATEGY_VARIANT.get(s) for s in inits}
        if variants & set(STAGE1_VARIANTS) and not self.pretrain_config:
            raise ConfigError(
                "pretrain_config is required by the stage 1 strategies "
                f"{[s for s in inits if STRATEGY_VARIANT.get(s) in STAGE1_VARIANTS]}"
            )
        if variants & set(OBJECTIVE_VARIANT_RUNS) and not self.objective_variants:
            raise ConfigError(
                "objective_variants is required by the strategies "
                f"{[s for s in inits if STRATEGY_VARIANT.get(s) in OBJECTIVE_VARIANT_RUNS]}, "
                "e.g. [lit, pooled_tags]"
            )
        masked = [s for s in inits if STRATEGY_VARIANT.get(s) in MASK_VARIANT_RUNS]
        if masked and not (self.data.mask_datasets or self.data.other_datasets):
            raise ConfigError(f"data.mask_datasets (or data.other_datasets) is required by {masked}")
        if "multidataset" in variants and not self.data.other_datasets:
            raise ConfigError("data.other_datasets is required by the multidataset strategy")

    def _validate_partial(self) -> None:
        for name in self.partial_strategies:
            if name not in PARTIAL_STRATEGIES:
                raise ConfigError(
                    f"partial_strategies: unknown partial-label strategy {name!r}; valid: {list(PARTIAL_STRATEGIES)}"
                )
        _check_init(self.partial_init, "partial_init")
        unused = sorted(set(self.partial_overrides) - set(self.partial_strategies))
        if unused:
            raise ConfigError(
                f"partial_overrides: {unused} are not in partial_strategies={self.partial_strategies}"
            )
        if self.partial_strategies and not self.data.other_datasets:
            raise ConfigError(
                "data.other_datasets is required by partial_strategies: the partially labelled datasets "
                "trained together with data.target"
            )


def _check_init(name: str, key: str) -> None:
    """An initialisation strategy name: one of STRATEGIES or ``checkpoint:PATH``."""
    if name.startswith(CHECKPOINT_PREFIX):
        if not name[len(CHECKPOINT_PREFIX) :].strip():
            raise ConfigError(f"{key}: {name!r} needs a path, e.g. checkpoint:runs/pretrain")
    elif name not in STRATEGY_VARIANT:
        raise ConfigError(f"{key}: unknown strategy {name!r}; valid: {[*STRATEGIES, 'checkpoint:PATH']}")
