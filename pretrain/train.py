"""Stage 1 entry point: ``mosmos pretrain --config FILE`` / ``accelerate launch -m mosmos.pretrain --config FILE``.

Reads the report table, parses organ tags, builds the image encoder, text encoder and pixel-tag
attention, trains them with the shared engine, evaluates each epoch and exports the encoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mosmos.config import check_divisible, load_config
from mosmos.engine import TrainConfig
from mosmos.export import Preprocessing, write_encoder_export
from mosmos.pretrain.config import PretrainConfig
from mosmos.vocabulary import Vocabulary, load_vocabulary

logger = logging.getLogger("mosmos")

#: Parameter-name prefix of the text tower inside the objective (``train.text_lr_scale`` applies to it).
TEXT_PARAMETERS = "model.text_encoder."


def _organ_name_embeddings(tokenizer, text_encoder, vocab: Vocabulary) -> torch.Tensor:
    """The text encoder's embedding of each organ's name: the initial pixel-tag queries."""
    batch = tokenizer([o.display for o in vocab.organs], padding=True, return_tensors="pt")
    was_training = text_encoder.training
    text_encoder.eval()
    with torch.no_grad():
        emb = text_encoder(batch["input_ids"], batch["attention_mask"])
    text_encoder.train(was_training)
    return emb.detach()


class PretrainTask:
    """What the engine needs for stage 1: model (with losses), data and the step/eval functions."""

    monitor = "tag_mAP"  # the validation metric train.early_stopping_patience watches

    def __init__(self, cfg: PretrainConfig, accelerator) -> None:
        from mosmos.models.losses import class_balance_weights
        from mosmos.models.pretrain_model import MosmosPretrainModel
        from mosmos.models.registry import create_image_encoder
        from mosmos.pretrain.data import build_datasets
        from mosmos.pretrain.objective import PretrainObjective
        from mosmos.pretrain.text import build_text_side

        self.cfg = cfg
        if cfg.data.mask_datasets and cfg.train.tag_weight == 0:
            from mosmos.errors import ConfigError

            raise ConfigError(
                "data.mask_datasets supervise the tag head's attention, which train.tag_weight=0 removes"
            )
        self.output_dir = Path(cfg.output_dir)
        self.vocab = load_vocabulary(cfg.data.vocabulary, cfg.data.organs)
        # the encoder first: a config it cannot run fails before any data is read
        image_encoder = create_image_encoder(
            cfg.model.image_encoder, spatial_dims=3, in_channels=1, **cfg.model.encoder_kwargs
        )
        check_divisible(
            "data.size", cfg.data.size, max(image_encoder.feature_strides), "the image encoder's total stride"
        )
        with accelerator.main_process_first():  # the others then read the main process's check cache
            data = build_datasets(cfg, self.vocab)
        if accelerator.is_main_process and cfg.data.on_bad_case == "skip":
            from mosmos.check.report import write_problems_csv

            write_problems_csv(self.output_dir / "skipped.csv", data.skipped)
        self.train_dataset, self.val_dataset = data.train, data.val
        self.organ_label_ids = data.organ_label_ids
        self.val_findings = data.val_findings

        tokenizer_dir = self.output_dir / "text"
        tokenizer, text_encoder = build_text_side(
            cfg.model.text_encoder,
            data.train_reports,
            pooling=cfg.model.text_pooling,
            text_kwargs=cfg.model.text_kwargs,
            tokenizer_vocab_size=cfg.model.tokenizer_vocab_size,
            trust_remote_code=cfg.model.trust_remote_code,
            saved_tokenizer=tokenizer_dir,
        )
        if accelerator.is_main_process:
            tokenizer.save_pretrained(str(tokenizer_dir))
        self.tokenizer = tokenizer
        query_init = _organ_name_embeddings(tokenizer, text_encoder, self.vocab)
        if cfg.model.tag_head.queries != "text":
            query_init = None
        if cfg.train.contrastive_weight == 0:
            text_encoder = None  # tags-only ablation: no report embedding is trained
        elif cfg.model.freeze_text:
            text_encoder.freeze()

        model = MosmosPretrainModel(
            image_encoder,
            text_encoder,
            embed_dim=cfg.model.embed_dim,
            num_tags=len(self.vocab) if cfg.train.tag_weight > 0 else 0,  # no tag branch: contrastive only
            tag_head_config=cfg.model.tag_head,
            image_embedding_grad=cfg.train.image_embedding_grad,
            embedding_from_tags=cfg.model.embedding_from_tags
            and text_encoder is not None
            and cfg.train.tag_weight > 0,
            query_init=query_init,
            init_temperature=cfg.model.init_temperature,
            max_logit_scale=cfg.model.max_logit_scale,
        )
        pos_weight = neg_weight = None
        if cfg.train.class_balance:
            pos_weight, neg_weight = class_balance_weights(torch.as_tensor(data.train_tags, dtype=torch.long))
        self.model = PretrainObjective(
            model,
            contrastive_weight=cfg.train.contrastive_weight,
            tag_weight=cfg.train.tag_weight,
            tag_loss=cfg.train.tag_loss,
            queue_size=cfg.train.queue_size,
            pos_weight=pos_weight,
            neg_weight=neg_weight,
            embedding_tag_weight=cfg.train.embedding_tag_weight,
            embed_dim=cfg.model.embed_dim if text_encoder is not None else image_encoder.embed_dim,
            num_tags=len(self.vocab),
            pooled_tag_weight=cfg.train.pooled_tag_weight,
            pooled_dim=image_encoder.embed_dim,
            mask_weight=cfg.train.mask_weight,
            equivariance_weight=cfg.train.equivariance_weight,
        )
        if cfg.train.text_lr_scale != 1.0:
            self.lr_scale = {TEXT_PARAMETERS: cfg.train.text_lr_scale}
        # Training batches are augmented as a whole (BatchAugment): on a GPU inside the step, on the
        # device; on a CPU in the loader's collation, so a worker does it while the model computes.
        self.augment_in_step = accelerator.device.type == "cuda"
        train_augment = None if self.augment_in_step else self.train_dataset.augment_batch
        # mosmos+masks: the masked scans take their share of each training batch in its collation
        self.mask_mixer = data.mask_mixer
        self.collate_fn = data.make_collator(tokenizer, cfg.data.max_length, train_augment, data.mask_mixer)
        self.eval_collate_fn = data.make_collator(tokenizer, cfg.data.max_length)

    def step(self, model, batch) -> dict[str, torch.Tensor]:
        if self.augment_in_step and model.training:
            batch = self.train_dataset.augment_batch(batch)
        return model(batch)

    def evaluate(self, objective, epoch: int) -> dict[str, float]:
        from mosmos.pretrain.evaluate import collect_outputs

        model = objective.model
        device = next(model.parameters()).device
        self.last_outputs = outputs = collect_outputs(
            model, self._loader(self.val_dataset), device, self.cfg.eval.max_cases
        )
        metrics = self._metrics(objective, outputs, findings=self.val_findings)
        n_train = min(self.cfg.eval.train_cases, len(self.train_dataset))
        if n_train > 0:
            from torch.utils.data import Subset

            # the same scans every time, without augmentation (the dataset's items are never augmented)
            subset = Subset(self.train_dataset, range(n_train))
            train_outputs = collect_outputs(model, self._loader(subset), device)
            for key, value in self._metrics(objective, train_outputs, findings=None).items():
                metrics[f"train/{key}"] = value
        return metrics

    def _loader(self, dataset):
        from torch.utils.data import DataLoader

        return DataLoader(dataset, batch_size=self.cfg.train.batch_size, collate_fn=self.eval_collate_fn)

    def _metrics(self, objective, outputs: dict, findings) -> dict[str, float]:
        from mosmos.pretrain.evaluate import compute_metrics

        device = next(objective.parameters()).device
        extra = {}
        if objective.embedding_tag_head is not None:
            extra["embedding_tag"] = objective.embedding_tag_logits(outputs["image_emb"].to(device)).cpu()
        if objective.pooled_tag_head is not None:
            pooled = objective.pooled_tag_head(outputs["pooled"].to(device)).cpu()
            extra["pooled_tag"] = pooled.view(len(pooled), -1, 2)
        return compute_metrics(
            outputs,
            self.vocab.names,
            self.organ_label_ids,
            extra,
            spacing=list(self.cfg.data.spacing),
            tolerance_mm=self.cfg.eval.pointing_tolerance_mm,
            findings=findings,
        )


def stage1_objective(cfg: PretrainConfig) -> dict[str, Any]:
    """The objective the export records: every loss weight and gradient setting of ``train`` (the
    fields stage 1 adds to the engine's), and the model and data settings that change what is learned."""
    engine = {f.name for f in dataclasses.fields(TrainConfig)}
    from mosmos.pretrain.config import objective_name

    # mosmos+masks is on with data.mask_datasets, not a train.variants entry: it needs data
    masks = ["masks"] if cfg.data.mask_datasets else []
    record: dict[str, Any] = {"name": objective_name([*cfg.train.variants, *masks])}
    record.update(
        {f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(cfg.train) if f.name not in engine}
    )
    record["freeze_text"] = cfg.model.freeze_text
    record["embedding_from_tags"] = cfg.model.embedding_from_tags
    record["shuffle_reports"] = cfg.data.shuffle_reports
    if masks:
        record["mask_datasets"] = list(cfg.data.mask_datasets)
        record["mask_ratio"] = cfg.data.mask_ratio
        record["mask_max_cases"] = cfg.data.mask_max_cases
    return record


def export(task: PretrainTask, objective, output_dir: Path) -> dict[str, Path]:
    """The encoder export (what stage 2 loads), the text tower, attention overlays; returns the
    per-organ attention montages written to ``output_dir/attention`` (``{organ: png}``)."""
    from mosmos.pretrain.metrics import save_attention_overlays
    from mosmos.pretrain.montage import save_attention_montages

    cfg, model = task.cfg, objective.model
    has_text, has_tags = model.text_encoder is not None, model.num_tags > 0
    objective_record = stage1_objective(cfg)
    mixer = getattr(task, "mask_mixer", None)
    if mixer is not None:
        objective_record["mask_scans"] = len(mixer.scans)  # the labelled scans that supervised the maps
    text = temperature = None
    if has_text:
        # the temperature as the loss used it: 1 / the clamped logit scale
        temperature = float(torch.exp(-model.logit_scale.detach().clamp(max=model.max_log_scale)))
        text = {
            "name": cfg.model.text_encoder,
            "pooling": cfg.model.text_pooling,
            "kwargs": cfg.model.text_kwargs,
            "max_length": cfg.data.max_length,
            "dir": "text",  # model and tokenizer, relative to the export
        }
    write_encoder_export(
        output_dir,
        cfg.model.image_encoder,
        model.image_encoder,
        Preprocessing(cfg.data.spacing, cfg.data.size, cfg.data.hu_window, cfg.data.body_threshold_hu),
        tag_head=model.tag_head if has_tags else None,
        organs=task.vocab.names if has_tags else [],
        projections={"image": model.image_proj, "text": model.text_proj} if has_text else None,
        temperature=temperature,
        text=text,
        objective=objective_record,
    )
    if has_text:
        model.text_encoder.model.save_pretrained(str(output_dir / "text"), safe_serialization=True)
    outputs = getattr(task, "last_outputs", None)
    montages: dict[str, Path] = {}
    if outputs is not None and outputs["attn_maps"] is not None and cfg.eval.attention_overlays > 0:
        n = min(cfg.eval.attention_overlays, len(outputs["image"]))
        for i in range(n):
            save_attention_overlays(
                outputs["image"][i],
                outputs["attn_maps"][i],
                task.vocab.names,
                output_dir / "attention",
                f"val{i:02d}",
            )
        ids = getattr(task, "organ_label_ids", None)
        labels = outputs.get("labels") if ids is not None else None
        montages = save_attention_montages(
            outputs["image"][:n],
            outputs["attn_maps"][:n],
            task.vocab.names,
            output_dir / "attention",
            labels=None if labels is None else labels[:n],
            organ_label_ids=ids if labels is not None else None,
        )
    return montages


def log_montages(accelerator, montages: dict[str, Path], step: int) -> None:
    """The attention montages as TensorBoard images (``attention/<organ>``), beside the run's scalars,
    when the run logs to TensorBoard (:func:`mosmos.engine.images.log_images`)."""
    from mosmos.engine.images import log_images

    log_images(accelerator, {f"attention/{organ}": path for organ, path in montages.items()}, step)


def run(cfg: PretrainConfig) -> dict:
    """Train stage 1 as configured; returns the final validation metrics."""
    from mosmos.engine import Engine, start_run
    from mosmos.engine.rundir import removed_if_start_fails

    output_dir = Path(cfg.output_dir)
    with removed_if_start_fails(output_dir):  # a config or data error leaves no half-made run folder
        engine_probe = start_run(cfg, cfg.train)
        task = PretrainTask(cfg, engine_probe)
        engine = Engine(task, cfg.train, output_dir, seed=cfg.seed, accelerator=engine_probe)
        history = engine.fit()
    if engine_probe.is_main_process and not engine.interrupted:
        montages = export(task, engine_probe.unwrap_model(engine.model), output_dir)
        log_montages(engine_probe, montages, engine.global_step)
        final = history[-1] if history else {}
        print(f"stage 1 finished: {output_dir}/encoder.safetensors")
        for key in (
            "i2t_R@1",
            "t2i_R@1",
            "tag_mAP",
            "tag_abnormal_AUROC",
            "pointing_game",
            "pointing_game_tolerant",
            "attention_border_fraction",
        ):
            if key in final:
                print(f"  {key:28s} {final[key]:.3f}")
        return final
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mosmos.pretrain", description="MOSMOS stage 1 pretraining"
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/pretrain/)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished run (or one of another config) in output_dir (train.overwrite=true)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *(["train.overwrite=true"] if args.overwrite else [])]
    cfg = load_config(PretrainConfig, args.config, overrides)
    np.set_printoptions(precision=3)
    from mosmos.engine.launch import run_stage_maybe_split

    return run_stage_maybe_split("mosmos.pretrain", args.config, overrides, cfg.train, lambda: run(cfg))
