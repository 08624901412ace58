"""The ``train`` section of every stage's config: what the engine reads, with its valid ranges."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mosmos.errors import ConfigError


@dataclass
class TrainConfig:
    """The ``train`` section every stage shares."""

    epochs: int = 10  # passes over the training set
    max_steps: int | None = None  # optimizer steps; when set, overrides epochs
    batch_size: int = 8  # per process
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not applied to norms/biases)
    warmup_steps: int = 50  # linear warmup, then cosine decay to 0
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = 1.0  # max gradient norm; null disables
    # autocast: fp16 on GPUs; bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX, see
    # mosmos.engine.precision), elsewhere full precision
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # DataLoader workers per process; auto: up to 8 beside a GPU; on a CPU-only machine 1 from 3 CPUs
    # per process, 0 (batches prepared in line) below
    # (mosmos.engine.autotune.resolve_num_workers)
    num_workers: int | Literal["auto"] = "auto"
    # on a machine without a GPU, `mosmos pretrain` / `mosmos finetune` train as this many data-parallel
    # processes, each with batch_size / n samples and its share of the CPUs (mosmos.engine.launch).
    # auto: one per CPU while each keeps at least 4 samples; 1: one process using every CPU's threads.
    # BatchNorm then sees batch_size / n samples: results differ from one process beyond rounding
    cpu_processes: int | Literal["auto"] = 1
    checkpoint_every: int = 200  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    # auto: continue the run in output_dir when it holds checkpoints of this same config, start
    # afresh when it holds none, refuse a finished run or another config's (mosmos.engine.rundir);
    # latest: continue from the newest checkpoint there, unchecked; a checkpoint directory; or
    # null: always afresh (refuses a directory holding checkpoints)
    resume: str | None = "auto"
    # with resume auto or null: remove an earlier run's files in output_dir first (`--overwrite`);
    # refused when the directory also holds files mosmos does not write
    overwrite: bool = False
    log_every: int = 10  # optimizer steps between log lines / TensorBoard points
    eval_every: int = 1  # epochs between evaluations
    max_bad_steps: int = 5  # consecutive non-finite steps before the run aborts
    deterministic: bool = False  # torch deterministic algorithms (for exact-resume checks)
    # store convolution weights channels-last (NDHWC): much faster or much slower 3D convolutions
    # depending on the machine and the layer shapes; same numbers up to float rounding, same
    # checkpoints (mosmos.channels_last). auto: time both on the first batch and keep the faster
    # (mosmos.engine.autotune)
    channels_last: bool | Literal["auto"] = "auto"
    # stop after this many evaluations without a new best of the stage's validation metric (stage 2:
    # mean Dice; stage 1: tag mAP); epochs / max_steps is then the cap. null: train the whole budget
    early_stopping_patience: int | None = None
    log_with: Literal["tensorboard", "wandb", "mlflow", "none"] = "tensorboard"  # accelerate's tracker
    # optimizer steps after which the model weights are also saved, to OUTPUT_DIR/snapshots/step_<k>/
    # (the stage's own weight files: stage 2 model.safetensors + model.json, which `mosmos evaluate`
    # reads), for learning curves; nothing else in the run changes; a step never reached gives none
    snapshot_steps: list[int] = field(default_factory=list)
    # stop after this many optimizer steps, with the learning-rate schedule still spanning the whole
    # budget (epochs / max_steps): the run a learning-curve snapshot stands for. null: the whole budget
    stop_after_steps: int | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first key whose value is out of range."""
        checks = {
            "train.epochs": self.epochs >= 1,
            "train.batch_size": self.batch_size >= 1,
            "train.lr": self.lr > 0,
            "train.weight_decay": self.weight_decay >= 0,
            "train.warmup_steps": self.warmup_steps >= 0,
            "train.grad_accum": self.grad_accum >= 1,
            "train.num_workers": self.num_workers == "auto" or self.num_workers >= 0,
            "train.cpu_processes": self.cpu_processes == "auto" or self.cpu_processes >= 1,
            "train.checkpoint_every": self.checkpoint_every >= 1,
            "train.keep_checkpoints": self.keep_checkpoints >= 1,
            "train.log_every": self.log_every >= 1,
            "train.eval_every": self.eval_every >= 1,
            "train.max_bad_steps": self.max_bad_steps >= 1,
            "train.early_stopping_patience": self.early_stopping_patience is None
            or self.early_stopping_patience >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key.split('.')[1])!r} is out of range")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps={self.max_steps} must be >= 1 or null")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ConfigError(f"train.stop_after_steps={self.stop_after_steps} must be >= 1 or null")
        if any(step < 1 for step in self.snapshot_steps):
            raise ConfigError(f"train.snapshot_steps={self.snapshot_steps}: optimizer steps must be >= 1")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"train.clip_grad={self.clip_grad} must be > 0 or null")
        import importlib.util

        if self.log_with != "none" and importlib.util.find_spec(self.log_with) is None:
            raise ConfigError(
                f"train.log_with={self.log_with}: the {self.log_with} package is not installed "
                f"(pip install {self.log_with}), or use train.log_with=none"
            )
