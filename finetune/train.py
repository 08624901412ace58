"""Stage 2 entry point: ``mosmos finetune --config FILE`` / ``accelerate launch -m mosmos.finetune --config FILE``.

Reads the partially labelled datasets, builds the segmentation network (optionally initialised from
a stage 1 encoder), trains it on the shared engine with the partial-label loss, evaluates on each
dataset's validation cases in their original geometry, and keeps the best weights by mean Dice.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from mosmos.config import check_divisible, load_config
from mosmos.finetune.config import FinetuneConfig
from mosmos.finetune.data import (  # load_label, organ_tasks: imported from here by older code
    build_seg_data,
    load_label,
    load_preprocess,
    organ_tasks,
)
from mosmos.finetune.inference import ModelSpec, Predictor, decode_probabilities, save_model
from mosmos.finetune.patches import build_train_dataset
from mosmos.io import atomic_write_bytes, write_json
from mosmos.vocabulary import load_vocabulary

logger = logging.getLogger("mosmos")

BEST_FILE = "best.json"
SPLIT_FILE = "split.json"  # the run's training and validation cases
VAL_CASES_FILE = "val_cases.csv"
OVERLAYS_DIR = "overlays"  # PNGs of the best model's predictions on a few validation cases


def overlay_cases(val: list, count: int, max_cases: int | None = None) -> set[tuple[int, str]]:
    """``(task index, case id)`` of the ``count`` validation cases drawn at each evaluation: the first of
    each dataset in turn (among those evaluated, ``eval.max_cases`` per dataset)."""
    per_task: dict[int, list] = {}
    for case, ti in val:
        if max_cases is None or len(per_task.get(ti, [])) < max_cases:
            per_task.setdefault(ti, []).append(case)
    chosen: list = []
    queues = [list(cases) for _, cases in sorted(per_task.items())]
    while len(chosen) < count and any(queues):
        for ti, queue in zip(sorted(per_task), queues, strict=True):
            if queue and len(chosen) < count:
                chosen.append((ti, queue.pop(0)))
    return {(ti, case.case_id) for ti, case in chosen}


def freeze_schedule(
    model: torch.nn.Module, freeze_encoder_steps: int, head_warmup_steps: int, transferred: list[str] | None
) -> dict[str, int]:
    """The engine's ``freeze_steps`` (parameter-name prefix -> initial optimizer steps at learning
    rate 0; the last matching prefix wins): the encoder (and attention head) for
    ``freeze_encoder_steps``, and with ``head_warmup_steps`` every ``transferred`` parameter for at
    least that long, so only the new ones (MultiTalent's fresh heads) train during the warm-up.

    Args:
        model: the segmenter.
        freeze_encoder_steps: ``train.freeze_encoder_steps``.
        head_warmup_steps: ``train.head_warmup_steps``.
        transferred: model keys ``model.init`` filled (:attr:`LoadReport.filled`); None with a random
            initialisation, where every parameter is new and the warm-up freezes nothing.
    """
    encoder = ("encoder.", "attention_head.")
    schedule = dict.fromkeys(encoder, freeze_encoder_steps)
    if head_warmup_steps and transferred:
        filled = set(transferred)
        for name, _ in model.named_parameters():
            if name in filled:  # exact names after the prefixes: they win
                base = freeze_encoder_steps if name.startswith(encoder) else 0
                schedule[name] = max(base, head_warmup_steps)
    return schedule


def safe_name(stem: str) -> str:
    """A file name from a dataset and case name (path separators and odd characters become _)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


class FinetuneTask:
    """What the engine needs for stage 2: model, patch stream, loss step, validation Dice."""

    monitor = "mean_dice"  # the validation metric train.early_stopping_patience watches

    def __init__(self, cfg: FinetuneConfig, accelerator) -> None:
        from mosmos.finetune.pretrained import build_segmenter
        from mosmos.models.deep_supervision import DeepSupervisionLoss
        from mosmos.models.seg_losses import MarginalLoss, MaskedBCEDiceLoss, MultiTalentLoss

        self.cfg, self.accelerator = cfg, accelerator
        self.output_dir = Path(cfg.output_dir)
        vocab = load_vocabulary(cfg.data.vocabulary)
        preprocess = load_preprocess(cfg)  # before the data checks: a bad model.init fails fast
        with accelerator.main_process_first():  # the others then read the main process's check cache
            self.data = build_seg_data(cfg, vocab)
        if accelerator.is_main_process and cfg.data.on_bad_case == "skip":
            from mosmos.check.report import write_problems_csv

            write_problems_csv(self.output_dir / "skipped.csv", self.data.skipped)
        if accelerator.is_main_process:  # which cases trained and validated this run
            write_json(
                self.output_dir / SPLIT_FILE,
                {
                    part: [{"dataset": c.dataset, "case": c.case_id} for c, _ in getattr(self.data, part)]
                    for part in ("train", "val")
                },
            )
        self.data.preprocess = preprocess
        decoder_kwargs = dict(cfg.model.decoder_kwargs)
        if cfg.train.deep_supervision:
            decoder_kwargs["deep_supervision"] = True
        channels = self.data.channels  # dataset_class: (task, organ) per channel; None: organs
        self.model, report = build_segmenter(
            cfg.model.name,
            num_classes=len(self.data.organs) if channels is None else len(channels),
            num_tasks=len(self.data.tasks),
            init=cfg.model.init,
            encoder=cfg.model.encoder,
            encoder_kwargs=cfg.model.encoder_kwargs,
            use_attention_maps=cfg.model.attention_maps,
            decoder_kwargs=decoder_kwargs,
            img_size=tuple(cfg.data.patch_size),
            transfer=cfg.model.transfer,
        )
        check_divisible(
            "data.patch_size",
            cfg.data.patch_size,
            max(self.model.encoder.feature_strides),
            "the encoder's total stride",
        )
        if report is not None:
            accelerator.print(report.format())
        self.train_dataset = build_train_dataset(cfg, self.data, self.output_dir)
        self.collate_fn = None
        if cfg.train.strategy == "marginal":
            self.loss = MarginalLoss(dice_weight=cfg.train.dice_weight, ce_weight=cfg.train.bce_weight)
        elif cfg.train.strategy == "multitalent":
            self.loss = MultiTalentLoss(
                bce_weight=cfg.train.bce_weight,
                dice_weight=cfg.train.dice_weight,
                batch_dice=cfg.train.batch_dice,
            )
        else:
            self.loss = MaskedBCEDiceLoss(bce_weight=cfg.train.bce_weight, dice_weight=cfg.train.dice_weight)
        if cfg.train.deep_supervision:  # the same loss at every supervised resolution, nnU-Net's weights
            self.loss = DeepSupervisionLoss(self.loss)
        prefixes = ["encoder.", "attention_head."]
        self.lr_scale = dict.fromkeys(prefixes, cfg.train.encoder_lr_scale)
        self.freeze_steps = freeze_schedule(
            self.model,
            cfg.train.freeze_encoder_steps,
            cfg.train.head_warmup_steps,
            None if report is None else report.filled,
        )
        self.rewarm_steps = cfg.train.rewarm_steps
        self.spec = ModelSpec(
            name=cfg.model.name,
            encoder=self.model.encoder.model_name,
            encoder_kwargs=self.model.encoder.encoder_config(),
            decoder=self.model.decoder_config(),
            attention_head=(
                self.model.attention_head.head_config() if self.model.attention_head is not None else None
            ),
            organs=self.data.organs,
            tasks=[{"name": t.name, "organs": t.organs} for t in self.data.tasks],
            organ_task=organ_tasks(self.data),
            strategy=cfg.train.strategy,
            preprocess=self.data.preprocess.to_dict(),
            extra={"init": cfg.model.init, "attention_maps": cfg.model.attention_maps},
            output_channels=cfg.model.output_channels,
            channels=(
                None
                if channels is None
                else [{"task": self.data.tasks[t].name, "organ": organ} for t, organ in channels]
            ),
        )
        best_path = self.output_dir / BEST_FILE
        self.best = json.loads(best_path.read_text()) if best_path.is_file() else None
        self.last_rows: list[dict] = []
        self.overlay_cases = overlay_cases(self.data.val, cfg.eval.overlays, cfg.eval.max_cases)
        self.overlays: dict[str, bytes] = {}  # PNGs of the last evaluation, by file stem
        self.eval_images: dict = {}  # the same as arrays, for the engine's TensorBoard log
        accelerator.print(
            f"stage 2: {len(self.data.tasks)} task(s), {len(self.data.organs)} organs, "
            f"{len(self.data.train)} training / {len(self.data.val)} validation cases"
        )
        for t in self.data.tasks:
            n_train = sum(1 for _, ti in self.data.train if ti == t.index)
            accelerator.print(f"  task {t.index} {t.name}: {n_train} training cases, organs {t.organs}")

    def save_snapshot(self, model: torch.nn.Module, folder: Path) -> None:
        """A ``train.snapshot_steps`` snapshot: the run's model files, so ``mosmos evaluate`` scores it."""
        save_model(folder, model, self.spec)

    def step(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        deep = {"intermediates": True} if self.cfg.train.deep_supervision else {}
        logits = model(batch["image"], task=batch["task"], mask=batch["body_mask"], **deep)
        return self.loss.components(logits, batch["label"], batch["labelled"])

    def validation_rows(self, model: torch.nn.Module) -> list[dict]:
        """Per case and labelled organ Dice / HD95 on the validation cases, in their original geometry."""
        from mosmos.finetune.metrics import case_metrics

        device = next(model.parameters()).device
        predictor = Predictor(
            model, self.spec, device, overlap=self.cfg.eval.overlap, sw_batch_size=self.cfg.eval.sw_batch_size
        )
        rows, per_task = [], {}
        for case, ti in self.data.val:
            per_task[ti] = per_task.get(ti, 0) + 1
            if self.cfg.eval.max_cases is not None and per_task[ti] > self.cfg.eval.max_cases:
                continue
            task = self.data.tasks[ti]
            probs, _ = predictor.probabilities(case.image, task=ti)
            pred = decode_probabilities(probs, self.spec.strategy)
            label, spacing = load_label(case.label, task.lut, task.name)
            for row in case_metrics(pred, label, self.data.organs, task.organs, spacing, self.cfg.eval.hd95):
                rows.append({"dataset": task.name, "case": case.case_id, **row})
            if (ti, case.case_id) in self.overlay_cases:
                from mosmos.finetune.overlays import case_overlay

                self.overlays[f"{task.name}_{case.case_id}"] = case_overlay(
                    case.image, label, pred, self.data.organs, f"{task.name} {case.case_id}"
                )
        return rows

    def evaluate(self, model: torch.nn.Module, epoch: int) -> dict[str, float]:
        from mosmos.finetune.metrics import summarize, write_case_csv
        from mosmos.finetune.overlays import png_array

        self.overlays = {}
        rows = self.validation_rows(model)
        summary = summarize(rows)
        mean = summary["mean_dice"]
        self.eval_images = {f"overlays/{stem}": png_array(png) for stem, png in self.overlays.items()}
        if self.best is None or mean > self.best["mean_dice"]:
            save_model(self.output_dir, model, self.spec)
            write_case_csv(rows, self.output_dir / VAL_CASES_FILE)
            for stem, png in self.overlays.items():  # the pictures of the model the run keeps
                atomic_write_bytes(self.output_dir / OVERLAYS_DIR / f"{safe_name(stem)}.png", png)
            self.best = {"mean_dice": mean, "epoch": epoch}
            write_json(self.output_dir / BEST_FILE, self.best)
        # overall means and per-dataset Dice go to the engine's history (NaN, e.g. an HD95 with an empty
        # prediction, becomes null so that metrics.json stays strict JSON)
        keep = {
            k: v for k, v in summary.items() if "/" not in k or (k.startswith("dice/") and k.count("/") == 1)
        }
        return {k: (None if v != v else float(v)) for k, v in keep.items()}


def run(cfg: FinetuneConfig) -> dict:
    """Train stage 2 as configured; returns the best validation metrics."""
    from mosmos.engine import Engine, start_run
    from mosmos.engine.rundir import removed_if_start_fails
    from mosmos.finetune.metrics import format_dice_table, read_case_csv, summarize

    output_dir = Path(cfg.output_dir)
    if cfg.train.strategy == "mutual":  # two stages of model cohorts: its own driver
        from mosmos.finetune.mutual import run_mutual

        with removed_if_start_fails(output_dir):
            return run_mutual(cfg)
    with removed_if_start_fails(output_dir):  # a config or data error leaves no half-made run folder
        accelerator = start_run(cfg, cfg.train)
        task = FinetuneTask(cfg, accelerator)
        engine = Engine(task, cfg.train, output_dir, seed=cfg.seed, accelerator=accelerator)
        history = engine.fit()
    if not accelerator.is_main_process or engine.interrupted:
        return {}
    best_epoch = task.best["epoch"] if task.best else None
    best = next((h for h in history if h.get("epoch") == best_epoch), history[-1] if history else {})
    metrics_path = output_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics["best"] = best
    write_json(metrics_path, metrics)
    print(
        f"stage 2 finished: {output_dir}/model.safetensors (best epoch {best_epoch}, mean Dice "
        f"{best.get('mean_dice', float('nan')):.3f})"
    )
    rows = read_case_csv(output_dir / VAL_CASES_FILE)
    print(format_dice_table(summarize(rows), task.data.organs))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mosmos.finetune", description="mosmos stage 2 fine-tuning"
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/finetune/)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished run (or one of another config) in output_dir (train.overwrite=true)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *(["train.overwrite=true"] if args.overwrite else [])]
    cfg = load_config(FinetuneConfig, args.config, overrides)
    from mosmos.engine.launch import run_stage_maybe_split

    return run_stage_maybe_split("mosmos.finetune", args.config, overrides, cfg.train, lambda: run(cfg))
