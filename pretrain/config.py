"""The stage 1 config: ``output_dir``, ``seed`` and the sections ``data``, ``model``, ``train``, ``eval``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mosmos.engine import TrainConfig
from mosmos.errors import ConfigError
from mosmos.models.tag_head import TagHeadConfig
from mosmos.transforms import resolve_augment


@dataclass
class PretrainData:
    table: str = ""  # report table: CT-RATE style CSV, or any CSV/JSONL/Parquet
    image_root: str | None = None  # folder the image column is relative to (default: the table's folder)
    image_column: str = "VolumeName"  # column holding the image file name or path
    report_columns: list[str] = field(
        default_factory=lambda: ["Findings_EN", "Impressions_EN"]
    )  # report text
    # CSV of 0/1 finding labels keyed by data.image_column (CT-RATE's 18 multi-abnormality labels); a
    # positive label marks its organ abnormal beside the parsed tags (docs/vocabulary.md)
    labels_table: str | None = None
    label_organs: dict = field(
        default_factory=dict
    )  # label column -> organs, adding to / replacing CT-RATE's
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
    # mosmos+masks: segmentation datasets (nnU-Net / MSD folders, datalists) whose labelled training
    # cases also supervise each organ's attention map; empty: off (the objective stays report-only)
    mask_datasets: list[str] = field(default_factory=list)
    mask_ratio: float = 0.25  # share of each training batch given to masked scans (with data.mask_datasets)
    mask_max_cases: int | None = None  # labelled cases used per mask dataset (first by case id; null: all)
    # per mask dataset (by name), its label name -> vocabulary organ, winning over the vocabulary's spellings
    mask_label_map: dict = field(default_factory=dict)
    mask_ignore_labels: dict = field(default_factory=dict)  # per mask dataset, label names to leave out

    def validate(self) -> None:
        if self.mask_datasets and not 0 < self.mask_ratio < 1:
            raise ConfigError(f"data.mask_ratio={self.mask_ratio} must be between 0 and 1 (exclusive)")
        if self.mask_max_cases is not None and self.mask_max_cases < 1:
            raise ConfigError(f"data.mask_max_cases={self.mask_max_cases} must be >= 1 or null")
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
    tag_head: TagHeadConfig = field(default_factory=TagHeadConfig)  # the pixel-tag attention head
    # the image embedding also reads the tag head's logits (organ-by-organ status), not only pooled features
    embedding_from_tags: bool = False
    init_temperature: float = 0.07  # CLIP temperature at start (learnable)
    max_logit_scale: float = 100.0  # clamp of 1/temperature

    #: Keys of earlier versions, with what became of them: the loader names them instead of only
    #: listing the valid keys, so that an old config fails with the reason.
    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "tag_dim": "moved to model.tag_head.dim",
        "tag_queries": "moved to model.tag_head.queries",
        "attention_level": "moved to model.tag_head.level",
        "attention_position_prior": "moved to model.tag_head.position_prior (default now [8, 8, 4])",
        "attention_min_inside": "moved to model.tag_head.min_inside (default now 1.0)",
        "attention_margin": "moved to model.tag_head.margin (default now 1)",
        "attention_values": "removed (no measured gain): values are always the finest encoder level "
        "averaged onto the attention grid (the former 'level0')",
        "attention_fuse_levels": "removed (no measured gain): the deeper levels are always fused "
        "into the attention's keys (the former true)",
        "attention_residual_average": "removed (no measured gain): there is no body-average (CSRA) "
        "path, the attended values alone give the tag logits (the former false)",
        "attention_init_sharpness": "removed (no measured gain): the attention starts flat, with "
        "no learned sharpness (the former 1.0)",
        "attention_prior_gain": "removed (no measured gain): the location prior's gain is fixed at "
        "10 (the former default)",
    }

    def validate(self) -> None:
        try:
            self.tag_head.check()
        except ValueError as err:
            raise ConfigError(f"model.tag_head.{err}") from None


@dataclass(frozen=True)
class ObjectiveVariant:
    """A named departure from the paper's stage 1 objective: the settings it changes."""

    settings: dict[str, object]  # dotted key ("train.image_embedding_grad") -> value
    description: str


#: The paper's objective (MOSMOS, Tian et al.): global contrastive alignment plus organ-tag
#: recognition through pixel-tag attention, both training the image encoder. These are the config
#: defaults; every departure below is a named variant, off unless ``train.variants`` lists it.
PAPER_OBJECTIVE: dict[str, object] = {
    "train.image_embedding_grad": 1.0,
    "train.text_lr_scale": 1.0,
    "train.embedding_tag_weight": 0.0,
    "train.pooled_tag_weight": 0.0,
    "model.embedding_from_tags": False,
    "train.equivariance_weight": 0.0,
}

OBJECTIVE_VARIANTS: dict[str, ObjectiveVariant] = {
    "lit": ObjectiveVariant(
        {"train.image_embedding_grad": 0.0, "train.text_lr_scale": 0.1},
        "locked-image tuning (LiT, Zhai et al. 2022): the contrastive term trains the text tower only, "
        "at a tenth of the learning rate; the image encoder learns from the tag terms",
    ),
    "embedding_tags": ObjectiveVariant(
        {"train.embedding_tag_weight": 0.5},
        "one linear tag classifier shared by the image and the report embedding (weight 0.5)",
    ),
    "pooled_tags": ObjectiveVariant(
        {"train.pooled_tag_weight": 1.0},
        "a linear tag classifier on the encoder's pooled features, trained jointly (weight 1)",
    ),
    "tags_in_embedding": ObjectiveVariant(
        {"model.embedding_from_tags": True},
        "the image embedding's projection also reads the pixel-tag head's logits",
    ),
    "equivariance": ObjectiveVariant(
        {"train.equivariance_weight": 0.1},
        "the attention maps of a flipped scan must be the flipped maps (weight 0.1; a second encoder pass)",
    ),
}


def objective_name(variants: list[str]) -> str:
    """``mosmos`` for the paper's objective, ``mosmos+lit+pooled_tags`` with variants (sorted)."""
    return "+".join(["mosmos", *sorted(variants)])


def _get(cfg: object, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def apply_variants(cfg: PretrainConfig) -> None:
    """Set the settings of ``cfg.train.variants``; a key the config set otherwise is an error.

    A key may hold the paper's value (the default: the variant sets it) or the variant's own value
    (a resolved config read back); any other value conflicts with the variant and is refused.
    """
    owner: dict[str, str] = {}
    for name in cfg.train.variants:
        if name not in OBJECTIVE_VARIANTS:
            raise ConfigError(
                f"train.variants: unknown objective variant {name!r}; valid: {sorted(OBJECTIVE_VARIANTS)} "
                "(an empty list is the paper's objective)"
            )
        for key, value in OBJECTIVE_VARIANTS[name].settings.items():
            if key in owner:
                raise ConfigError(f"train.variants: {owner[key]!r} and {name!r} both set {key}")
            owner[key] = name
            current = _get(cfg, key)
            if current != value and current != PAPER_OBJECTIVE[key]:
                raise ConfigError(
                    f"train.variants lists {name!r}, which sets {key}={value}, but the config sets "
                    f"{key}={current}: drop one of them"
                )
            section, field_name = key.split(".")
            setattr(getattr(cfg, section), field_name, value)


@dataclass
class PretrainTrain(TrainConfig):
    contrastive_weight: float = 1.0  # weight of the image-report InfoNCE term (0 disables it)
    tag_weight: float = 1.0  # weight of the organ-tag term (0 disables it)
    # named departures from the paper's objective (see OBJECTIVE_VARIANTS: lit, embedding_tags,
    # pooled_tags, tags_in_embedding, equivariance); empty: the paper's objective
    variants: list[str] = field(default_factory=list)
    embedding_tag_weight: float = 0.0  # tags predicted from the image and report embeddings (0 disables)
    pooled_tag_weight: float = 0.0  # tags predicted linearly from the encoder's pooled features (0 disables)
    tag_loss: Literal["bce", "asl"] = "bce"  # multi-label loss
    class_balance: bool = True  # weight tag classes by training-set frequency
    text_lr_scale: float = 1.0  # learning rate of the text encoder relative to train.lr
    queue_size: int = 0  # memory queue of past embeddings as extra negatives (0: off)
    # share of the image-embedding (contrastive, embedding-tag) gradient that reaches the image encoder;
    # 0: the encoder learns from the tag heads only and the text tower aligns to it (LiT)
    image_embedding_grad: float = 1.0
    # weight of the attention-mask term on the masked scans of data.mask_datasets (mosmos+masks)
    mask_weight: float = 1.0
    # weight of the attention-equivariance term under random flips (variant equivariance; 0 disables it)
    equivariance_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.mask_weight < 0 or self.equivariance_weight < 0:
            raise ConfigError("train.mask_weight and train.equivariance_weight must be >= 0")
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
        apply_variants(self)
        self.train.validate()
