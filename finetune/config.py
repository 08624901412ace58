"""The stage 2 config: ``output_dir``, ``seed`` and the sections ``data``, ``model``, ``train``, ``eval``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mosmos.engine import TrainConfig
from mosmos.errors import ConfigError
from mosmos.transforms import resolve_augment

SEGMENTERS = ("mo_ctrans", "mo_ctrans_conv", "unet", "unetr")
DEEP_SUPERVISED = ("unet", "mo_ctrans_conv")  # networks whose decoder has deep-supervision outputs


@dataclass
class FinetuneData:
    # nnU-Net v2 raw dataset folders, MSD folders or MONAI datalist JSON files; one task per dataset
    datasets: list[str] = field(default_factory=list)
    # per-dataset overrides of the label-name mapping: {dataset name: {its label name: vocabulary organ}}
    label_map: dict[str, dict[str, str]] = field(default_factory=dict)
    # per-dataset label names to drop (voxels become background; the organ counts as unlabelled there)
    ignore_labels: dict[str, list[str]] = field(default_factory=dict)
    # label ids -> names for datalist JSONs that do not declare them: {dataset name: {id: name}}
    labels: dict[str, dict[int, str]] = field(default_factory=dict)
    vocabulary: str | None = None  # organ vocabulary YAML (default: configs/organs.yaml)
    fraction: float = 1.0  # share of each dataset's training cases kept (seeded subset; benchmark)
    # at most this many labelled training cases per dataset (after data.fraction; the same seeded
    # order, so a smaller count keeps a subset of a larger one's cases); null: no cap
    max_train_cases: int | None = None
    # the datasets data.fraction and data.max_train_cases subset (data.datasets entries or dataset
    # names; e.g. the benchmark's target, trained beside whole partially labelled datasets); null: all
    subset_datasets: list[str] | None = None
    val_fraction: float = 0.2  # held-out share of each dataset's cases, split by seed (at least one)
    # voxel size (mm, RAS), HU window and body threshold; null: from the stage 1 encoder.json when
    # model.init names one (so both stages see the same volumes), else the defaults below
    spacing: list[float] | None = None
    hu_window: list[float] | None = None  # HU mapped to [0, 1]; null: as for spacing
    body_threshold_hu: float | None = None  # voxels above this HU are body; null: as for spacing
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 64])  # training patch and sliding window
    foreground_fraction: float = 0.33  # patches centred on a random labelled organ voxel (nnU-Net's 1/3)
    # dataset balance: "sqrt" draws a case with probability proportional to 1/sqrt(its dataset's size)
    # (MultiTalent), "equal" gives every dataset the same share, "proportional" every case the same
    balance: Literal["sqrt", "equal", "proportional"] = "sqrt"
    samples_per_epoch: int | None = None  # patches per epoch (default: the number of training cases)
    augment: bool = True  # random affine / intensity augmentation of training patches
    # overrides of the augmentation's defaults (mosmos.transforms.AUGMENT_DEFAULTS), e.g. {rotate_deg: 15}
    augment_options: dict = field(default_factory=dict)
    cache_dir: str | None = None  # preprocessed-volume cache (default: OUTPUT_DIR/../.cache/finetune)
    # the start-up checks of every case used (see `mosmos check`): "full" reads the voxels too (NaN/inf,
    # label values, truncated files; results cached per file), "header" only headers, "none" skips them
    check: Literal["full", "header", "none"] = "full"
    # a case that fails them: "error" stops before training and lists every problem; "skip" leaves it
    # out and records it in RUN/skipped.csv
    on_bad_case: Literal["error", "skip"] = "error"

    def validate(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"data.fraction={self.fraction} must be in (0, 1]")
        resolve_augment(self.augment_options, "data.augment_options")
        if self.max_train_cases is not None and self.max_train_cases < 1:
            raise ConfigError(f"data.max_train_cases={self.max_train_cases} must be >= 1 or null")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be between 0 and 1")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ConfigError(f"data.spacing={self.spacing} must be three positive numbers (mm) or null")
        if self.hu_window is not None and (
            len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]
        ):
            raise ConfigError(f"data.hu_window={self.hu_window} must be [low, high] with low < high, or null")
        if len(self.patch_size) != 3 or min(self.patch_size) < 8:
            raise ConfigError(f"data.patch_size={self.patch_size} must be three integers >= 8")
        if not 0 <= self.foreground_fraction <= 1:
            raise ConfigError(f"data.foreground_fraction={self.foreground_fraction} must be in [0, 1]")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(f"data.samples_per_epoch={self.samples_per_epoch} must be >= 1 or null")


@dataclass
class FinetuneModel:
    # segmentation network: mo_ctrans (the paper's Transformer decoder over one token grid, a task token
    # per dataset), mo_ctrans_conv (a U-Net decoder with windowed task-token transformers), unet, unetr
    name: Literal["mo_ctrans", "mo_ctrans_conv", "unet", "unetr"] = "mo_ctrans"
    # "random", a stage 1 run directory, or an encoder .safetensors file (encoder.json beside it)
    init: str = "random"
    # image encoder registry name and kwargs; null: from the stage 1 encoder.json (init=PATH), else
    # the network's default (rescnn3d for mo_ctrans/mo_ctrans_conv/unet, vit3d for unetr)
    encoder: str | None = None
    encoder_kwargs: dict | None = None  # constructor arguments of the encoder; null: as for encoder
    decoder_kwargs: dict = field(default_factory=dict)  # network-specific decoder arguments
    # MOSMOS transfer: feed the stage 1 pixel-tag attention maps to the decoder as extra channels
    attention_maps: bool = False
    # what model.init transfers: "encoder" (a stage 1 export, or a stage 2 run's encoder export), or
    # "encoder_decoder" (a stage 2 run directory: the whole network but its output head and task
    # tokens, which start fresh; MultiTalent's transfer, pair it with train.head_warmup_steps)
    transfer: Literal["encoder", "encoder_decoder"] = "encoder"
    # "organ": one output channel per vocabulary organ; "dataset_class": one sigmoid channel per
    # (dataset, organ it labels), merged into organs at evaluation and prediction (MultiTalent; needs
    # train.strategy=multitalent; see docs/stage2-finetune.md)
    output_channels: Literal["organ", "dataset_class"] = "organ"


@dataclass
class MutualConfig:
    """``train.mutual``: deep mutual learning (Liu et al. 2024, arXiv:2407.12611; see
    :mod:`mosmos.finetune.mutual`). Used only with ``train.strategy: mutual``."""

    stage_a_epochs: int | None = None  # epochs of the partial-organ models (null: train.epochs)
    stage_b_epochs: int | None = None  # epochs of the full-organ models (null: train.epochs)
    prediction_difference: float = 1.0  # weight of stage A's prediction-difference loss
    feature_difference: float = 0.1  # weight of stage A's feature-difference loss
    consistency: float = 1.0  # weight of stage B's prediction consistency (KL to each peer)
    feature_similarity: float = 0.1  # weight of stage B's dynamic feature similarity
    pseudo_high: float = 0.8  # a peer's probability at or above which it becomes a pseudo label
    pseudo_low: float = 0.2  # probability at or below which every unlabelled organ is background
    final: Literal["best", "ensemble"] = "best"  # the run's model: best stage B model, or all averaged
    # a fully labelled dataset (e.g. the synthetic test set) to score the pseudo labels against; null:
    # scored only on the organs each training dataset labels and another dataset's model segments
    quality_data: str | None = None

    def validate(self) -> None:
        for key in ("stage_a_epochs", "stage_b_epochs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"train.mutual.{key}={value} must be >= 1 or null")
        for key in ("prediction_difference", "feature_difference", "consistency", "feature_similarity"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.mutual.{key}={getattr(self, key)} must be >= 0")
        if not 0 <= self.pseudo_low < self.pseudo_high <= 1:
            raise ConfigError(
                f"train.mutual.pseudo_low={self.pseudo_low} and pseudo_high={self.pseudo_high} must satisfy "
                "0 <= pseudo_low < pseudo_high <= 1 (voxels between them are ignored)"
            )


@dataclass
class FinetuneTrain(TrainConfig):
    # masked: BCE + soft Dice on the organs each sample's dataset labels, averaged over them;
    # marginal: softmax with unlabelled organs merged into background (Shi et al. 2021);
    # multitalent: BCE + batch Dice on the valid channels, summed over channels (Ulrich et al. 2023);
    # mutual: deep mutual learning, two stages of model cohorts (Liu et al. 2024; train.mutual)
    strategy: Literal["masked", "marginal", "multitalent", "mutual"] = "masked"
    bce_weight: float = 1.0  # weight of the BCE / cross-entropy term
    dice_weight: float = 1.0  # weight of the soft Dice term
    encoder_lr_scale: float = 1.0  # learning rate of the encoder (and attention head) relative to train.lr
    freeze_encoder_steps: int = 0  # keep the encoder fixed for the first N optimizer steps
    # MultiTalent's head warm-up: for the first N optimizer steps only the parameters model.init did
    # not transfer (with model.transfer=encoder_decoder: the output head and task tokens) train
    head_warmup_steps: int = 0
    # after the encoder freeze or the head warm-up, the parameters that were held ramp their learning
    # rate up linearly again over N steps (nnU-Net's second warm-up when fine-tuning pretrained
    # weights); 0: they join the schedule at its current rate at once
    rewarm_steps: int = 0
    # multitalent only: pool the Dice sums of each channel over the batch (nnU-Net's batch Dice)
    batch_dice: bool = True
    # nnU-Net's deep supervision: the loss also on the decoder's coarser outputs, weighted 1/2^k
    # (normalised); unet and mo_ctrans_conv only, any strategy but mutual
    deep_supervision: bool = False
    mutual: MutualConfig = field(default_factory=MutualConfig)  # train.strategy=mutual settings

    def validate(self) -> None:
        super().validate()
        if self.bce_weight < 0 or self.dice_weight < 0 or self.bce_weight + self.dice_weight == 0:
            raise ConfigError("train.bce_weight and train.dice_weight must be >= 0, not both 0")
        if self.encoder_lr_scale < 0:
            raise ConfigError(f"train.encoder_lr_scale={self.encoder_lr_scale} must be >= 0")
        if self.freeze_encoder_steps < 0:
            raise ConfigError(f"train.freeze_encoder_steps={self.freeze_encoder_steps} must be >= 0")
        if self.head_warmup_steps < 0:
            raise ConfigError(f"train.head_warmup_steps={self.head_warmup_steps} must be >= 0")
        if self.rewarm_steps < 0:
            raise ConfigError(f"train.rewarm_steps={self.rewarm_steps} must be >= 0")


@dataclass
class SlidingWindowEval:
    """Sliding-window inference settings (validation, ``mosmos evaluate``, the benchmark's test set)."""

    overlap: float = 0.25  # sliding-window overlap
    sw_batch_size: int = 2  # windows per forward pass

    def validate(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"eval.overlap={self.overlap} must be in [0, 1)")
        if self.sw_batch_size < 1:
            raise ConfigError(f"eval.sw_batch_size={self.sw_batch_size} must be >= 1")


@dataclass
class FinetuneEval(SlidingWindowEval):
    hd95: bool = True  # also compute the 95% Hausdorff distance (slower than Dice)
    max_cases: int | None = None  # cap on validation cases per dataset per evaluation
    # validation cases drawn at each evaluation (an axial slice: ground truth outlined, prediction
    # filled, per organ) to TensorBoard, and those of the best model to RUN/overlays/*.png (0: off)
    overlays: int = 4

    def validate(self) -> None:
        super().validate()
        if self.overlays < 0:
            raise ConfigError(f"eval.overlays={self.overlays} must be >= 0 (0 draws none)")


@dataclass
class FinetuneConfig:
    output_dir: str = "runs/finetune"  # the run directory
    seed: int = 0  # one seed for split, subset, sampling, augmentation and initialisation
    data: FinetuneData = field(default_factory=FinetuneData)
    model: FinetuneModel = field(default_factory=FinetuneModel)
    train: FinetuneTrain = field(default_factory=FinetuneTrain)
    eval: FinetuneEval = field(default_factory=FinetuneEval)

    def validate(self) -> None:
        if not self.data.datasets:
            raise ConfigError(
                "data.datasets is required: a list of nnU-Net / MSD dataset folders or datalist JSONs"
            )
        if self.train.deep_supervision and (
            self.model.name not in DEEP_SUPERVISED or self.train.strategy == "mutual"
        ):
            raise ConfigError(
                f"train.deep_supervision=true needs model.name in {list(DEEP_SUPERVISED)} and a strategy "
                f"other than mutual (got model.name={self.model.name}, train.strategy={self.train.strategy})"
            )
        if self.model.output_channels == "dataset_class" and self.train.strategy != "multitalent":
            raise ConfigError(
                "model.output_channels=dataset_class needs train.strategy=multitalent (its loss sums over "
                f"each case's valid channels); got train.strategy={self.train.strategy}"
            )
        if self.train.strategy == "mutual" and (
            self.model.transfer != "encoder"
            or self.train.head_warmup_steps
            or self.model.output_channels != "organ"
        ):
            raise ConfigError(
                "train.strategy=mutual builds its own model cohorts: it supports model.transfer=encoder, "
                "train.head_warmup_steps=0 and model.output_channels=organ only"
            )
        if self.model.transfer == "encoder_decoder" and self.model.init == "random":
            raise ConfigError(
                "model.transfer=encoder_decoder needs a stage 2 run directory in model.init (the network "
                "to transfer); with init=random there is nothing to transfer"
            )
        if self.model.attention_maps and self.model.init == "random":
            raise ConfigError(
                "model.attention_maps=true needs a stage 1 encoder in model.init (a run directory or "
                "encoder.safetensors); with init=random there are no attention maps to transfer"
            )
