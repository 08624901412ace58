"""The stage 1 config: ``output_dir``, ``seed`` and the sections ``data``, ``model``, ``train``, ``eval``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mosmos.engine import TrainConfig
from mosmos.errors import ConfigError
from mosmos.transforms import resolve_augment


@dataclass
class PretrainData:
    table: str = ""  # report table: CT-RATE style CSV, or any CSV/JSONL/Parquet
    image_root: str | None = None  # folder the image column is relative to (default: the table's folder)
    image_column: str = "VolumeName"  # column holding the image file name or path
    report_columns: list[str] = field(
        default_factory=lambda: ["Findings_EN", "Impressions_EN"]
    )  # report text
    vocabulary: str | None = None  # organ vocabulary YAML (default: configs/organs.yaml)
    organs: list[str] | None = None  # organs to tag (default: every vocabulary organ)
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 3.0])  # resampling target, mm (RAS)
    size: list[int] = field(default_factory=lambda: [128, 128, 64])  # network input, voxels
    hu_window: list[float] = field(default_factory=lambda: [-200.0, 300.0])  # HU mapped to [0, 1]
    body_threshold_hu: float = -500.0  # voxels above this are body (attention is restricted to them)
    val_fraction: float = 0.15  # held-out share of cases, split by seed
    cache_dir: str | None = None  # preprocessed-volume cache (default: OUTPUT_DIR/../.cache/pretrain)
    augment: bool = True  # random affine / intensity augmentation of training images
    # overrides of the augmentation's defaults (mosmos.transforms.AUGMENT_DEFAULTS), e.g.
    # {rotate_deg: 0, scale: 0} for translations and intensity changes only
    augment_options: dict = field(default_factory=dict)
    max_length: int = 256  # report tokens
    shuffle_reports: bool = False  # control experiment: pair every scan with another scan's report
    ground_truth: str | None = None  # folder with findings.json and labels/ (synthetic data: pointing game)
    # the start-up checks of every case used (see `mosmos check`): "full" reads the voxels too (NaN/inf,
    # label values, truncated files; results cached per file), "header" only headers, "none" skips them
    check: Literal["full", "header", "none"] = "full"
    # a case that fails them: "error" stops before training and lists every problem; "skip" leaves it
    # out and records it in RUN/skipped.csv
    on_bad_case: Literal["error", "skip"] = "error"

    def validate(self) -> None:
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ConfigError(f"data.spacing={self.spacing} must be three positive numbers (mm)")
        if len(self.size) != 3 or min(self.size) < 8:
            raise ConfigError(f"data.size={self.size} must be three integers >= 8")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            raise ConfigError(f"data.hu_window={self.hu_window} must be [low, high] with low < high")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be between 0 and 1")
        if not self.report_columns:
            raise ConfigError("data.report_columns must name at least one column")
        resolve_augment(self.augment_options, "data.augment_options")


@dataclass
class PretrainModel:
    image_encoder: str = "rescnn3d"  # registry name (see `mosmos models`)
    encoder_kwargs: dict = field(default_factory=dict)  # constructor arguments of the image encoder
    text_encoder: str = "small-bert"  # "small-bert" (built offline), a local HF directory, or a hub name
    text_pooling: Literal["cls", "mean"] = "mean"  # report embedding from token states
    text_kwargs: dict = field(default_factory=dict)  # small-bert size: hidden_size, num_layers, num_heads...
    tokenizer_vocab_size: int = 2000  # WordPiece vocabulary trained on the reports (small-bert only)
    freeze_text: bool = False  # freeze the text encoder and cache report embeddings
    trust_remote_code: bool = False  # allow custom code from a HF model repository
    embed_dim: int = 128  # shared image-report embedding size
    tag_dim: int = 128  # pixel-tag attention width
    tag_queries: Literal["text", "learned"] = "text"  # initialise tag queries from organ-name embeddings
    attention_level: int | None = None  # encoder level the pixel-tag attention reads (default: stride <= 4)
    # fuse deeper levels into the attention keys (context to find organs); values stay local
    attention_fuse_levels: bool = True
    # what the attention reads where it looks: the finest encoder level averaged ("level0") or
    # max-pooled ("level0_max": a finding smaller than a map cell keeps its strength) onto the map,
    # or patch embeddings of the input ("patch")
    attention_values: Literal["level0", "level0_max", "patch"] = "level0"
    # share of a map cell that must lie inside the body for the attention to look there (0: any voxel;
    # 1: the whole cell, which keeps the body's outline, a position shortcut, out of reach)
    attention_min_inside: float = 0.0
    attention_margin: int = 0  # map cells this close to the scan's edge are out of the attention's reach
    attention_residual_average: bool = True  # add the body-average value to the attended one (CSRA)
    attention_init_sharpness: float = (
        1.0  # initial multiplier of the attention scores (learned per tag when != 1)
    )
    # the image embedding also reads the tag head's logits (organ-by-organ status), not only pooled features
    embedding_from_tags: bool = False
    # learned per-tag location prior on a coarse grid (e.g. [8, 8, 4]) added to the attention scores
    attention_position_prior: list[int] | None = None
    attention_prior_gain: float = 10.0  # scale of the prior (and of its learning rate)
    init_temperature: float = 0.07  # CLIP temperature at start (learnable)
    max_logit_scale: float = 100.0  # clamp of 1/temperature


@dataclass
class PretrainTrain(TrainConfig):
    contrastive_weight: float = 1.0  # weight of the image-report InfoNCE term (0 disables it)
    tag_weight: float = 1.0  # weight of the organ-tag term (0 disables it)
    embedding_tag_weight: float = 0.5  # tags predicted from the image and report embeddings (0 disables)
    pooled_tag_weight: float = 1.0  # tags predicted linearly from the encoder's pooled features (0 disables)
    tag_loss: Literal["bce", "asl"] = "bce"  # multi-label loss
    class_balance: bool = True  # weight tag classes by training-set frequency
    text_lr_scale: float = 1.0  # learning rate of the text encoder relative to train.lr
    queue_size: int = 0  # memory queue of past embeddings as extra negatives (0: off)
    # share of the image-embedding (contrastive, embedding-tag) gradient that reaches the image encoder;
    # 0: the encoder learns from the tag heads only and the text tower aligns to it (LiT)
    image_embedding_grad: float = 1.0

    def validate(self) -> None:
        super().validate()
        if (
            self.contrastive_weight < 0
            or self.tag_weight < 0
            or self.contrastive_weight + self.tag_weight == 0
        ):
            raise ConfigError("train.contrastive_weight and train.tag_weight must be >= 0, not both 0")
        if self.embedding_tag_weight < 0 or self.pooled_tag_weight < 0:
            raise ConfigError("train.embedding_tag_weight and train.pooled_tag_weight must be >= 0")
        if not self.text_lr_scale > 0:
            raise ConfigError(f"train.text_lr_scale={self.text_lr_scale} must be > 0")
        if self.queue_size < 0:
            raise ConfigError(f"train.queue_size={self.queue_size} must be >= 0")
        if not 0.0 <= self.image_embedding_grad <= 1.0:
            raise ConfigError(f"train.image_embedding_grad={self.image_embedding_grad} must be in [0, 1]")
        if self.image_embedding_grad == 0 and self.tag_weight == 0:
            raise ConfigError(
                "train.image_embedding_grad=0 with train.tag_weight=0 leaves the image encoder nothing to learn from"
            )


@dataclass
class PretrainEval:
    attention_overlays: int = 4  # validation scans drawn to RUN/attention/*.png at the end
    max_cases: int | None = None  # cap on validation cases per evaluation
    # pointing_game_tolerant also counts attention peaks this close to their organ (mm, voxel centres;
    # the original pointing game allows 15 pixels); pointing_game stays the strict inside-the-organ rate
    pointing_tolerance_mm: float = 12.0
    # also score this many training pairs (the first of the training split, without augmentation)
    # at every evaluation, as train/<metric>: a training AUROC far above the validation one shows
    # that the encoder memorises its scans instead of learning the findings (0: off)
    train_cases: int = 0

    def validate(self) -> None:
        if not self.pointing_tolerance_mm >= 0:
            raise ConfigError(f"eval.pointing_tolerance_mm={self.pointing_tolerance_mm} must be >= 0")
        if not isinstance(self.train_cases, int) or self.train_cases < 0:
            raise ConfigError(f"eval.train_cases={self.train_cases!r} must be an integer >= 0")


@dataclass
class PretrainConfig:
    output_dir: str = "runs/pretrain"  # the run directory
    seed: int = 0  # one seed for split, sampling, augmentation and initialisation
    data: PretrainData = field(default_factory=PretrainData)
    model: PretrainModel = field(default_factory=PretrainModel)
    train: PretrainTrain = field(default_factory=PretrainTrain)
    eval: PretrainEval = field(default_factory=PretrainEval)

    def validate(self) -> None:
        if not self.data.table:
            raise ConfigError("data.table is required: the report table (CSV/JSONL/Parquet)")
