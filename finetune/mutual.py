"""``train.strategy: mutual``: deep mutual learning among partially labelled datasets.

Liu et al., "Deep Mutual Learning among Partially Labeled Datasets for Multi-Organ Segmentation"
(arXiv:2407.12611). Two stages of model cohorts, each trained by the shared engine
(:class:`mosmos.engine.Engine`: checkpoints, exact resume, Ctrl-C) in its own folder of the run::

    RUN/stage_a/            partial-organ models, one per dataset (member_<k>/ model dirs, checkpoints/)
    RUN/pseudo_labels/      full-organ targets of every training case, quality.csv / quality.json
    RUN/stage_b/            full-organ models, one per dataset (member_<k>/, checkpoints/)
    RUN/model.safetensors   the final model (+ model.json, val_cases.csv, best.json, metrics.json):
                            an ordinary stage 2 run directory for ``mosmos evaluate`` / ``predict``

The parts: :mod:`~mosmos.finetune.mutual_stage` (the cohorts and the engine task of both stages),
:mod:`~mosmos.finetune.mutual_pseudo` (pseudo labels and their quality report), this module (the
driver: stages in order, resume, the final model).

Stage A. Model ``k`` segments the organs dataset ``k`` labels (one sigmoid each). On every image it
is supervised by the labels of those organs that the image's dataset labels (its own dataset's, and
another dataset's where label sets overlap: masked BCE + Dice), plus mutual *difference* learning:

- prediction difference (:func:`~mosmos.models.mutual_losses.prediction_difference_loss`): on an
  image of dataset ``j``, voxels ``j`` labels as organs model ``k`` does not segment are pushed to
  background in every channel of model ``k``;
- feature difference (:func:`~mosmos.models.mutual_losses.feature_difference_loss`): the prototypes
  (mean last-decoder feature) of model ``k``'s organs are kept apart (cosine similarity above 0 is
  penalised) from the prototypes of the organs dataset ``j`` labels that ``k`` does not segment.

Pseudo labels (:func:`~mosmos.models.mutual_losses.merge_pseudo_labels`), in the preprocessed grid
of every training case: true labels where its dataset has them (they always win); elsewhere the
most probable organ the dataset does not label, averaged over the other datasets' models that
segment it, if at least ``pseudo_high``; background if every such probability is at most
``pseudo_low``; ignored (per-voxel ignore in stage B's loss) in between.

Stage B. Model ``k`` segments every organ. On images of dataset ``k`` it learns from the true +
pseudo labels (ignored voxels excluded); on the other datasets' images from their true labels only
(masked to the organs they label). Mutual *similarity* learning couples the models:

- prediction consistency (:func:`~mosmos.models.mutual_losses.mutual_consistency_loss`): each
  model's per-organ Bernoulli KL towards each peer's prediction (the peer detached);
- dynamic feature similarity (:func:`~mosmos.models.mutual_losses.feature_similarity_loss`): per
  organ, every model's prototype is pulled towards that of the model with the best validation Dice on
  that organ at the latest evaluation (stop-gradient on the target).

Choices where the paper is silent (or where this implementation departs), each configurable where
it says so:

- One sigmoid per organ in both stages (the masked strategy's convention), so every model's output
  is read by the unchanged inference code (``strategy: mutual`` in ``model.json`` means sigmoids).
- A partial-organ model is also supervised by another dataset's labels of its organs (overlapping
  label sets); "its own labels" in the paper assumes disjoint sets.
- "Organ features" are the input of each network's output block (``model.out``: the last decoder
  features, full resolution), pooled per organ region. Stage A's feature difference compares a
  model's own organs (true labels where the image's dataset labels them, else the model's own
  prediction above 0.5, without gradient through the region) with the other organs the image's
  dataset labels, within that model's feature space (different models' spaces are not aligned).
- The stage B consistency is the DML KL (Zhang et al. 2018) in its per-organ Bernoulli form, over
  every voxel of the patch; weights ``train.mutual.consistency`` and ``feature_similarity``. Each
  model's loss is its supervised loss + weight x its mean term; the engine minimises their sum.
- The most accurate model per organ is the best by the latest validation Dice (mean over the
  datasets labelling the organ; ties to the lower index); before the first evaluation there is no
  such model and the feature-similarity term is 0.
- Stage B models start afresh (random or ``model.init``), not from stage A's weights.
- Each member keeps its own best weights (by its mean validation Dice over the organs it segments);
  stage A's best weights make the pseudo labels. ``train.mutual.final: best`` makes the stage B
  member with the highest best mean Dice the run's model; ``ensemble`` averages every member's
  probabilities (:class:`~mosmos.models.segmentation.ensemble.EnsembleSegmenter`).
- Pseudo-label quality: each training case's pseudo labels for the organs its dataset *does* label
  are recomputed as if those labels were hidden and scored against them (``held_out_labels``); with
  ``train.mutual.quality_data`` (a fully labelled dataset), each of its cases is pseudo-labelled as
  if it belonged to each training dataset and scored on the organs that dataset does not label
  (``ground_truth``). Dice is in the preprocessed grid; an ignored voxel counts as not the organ.
- Resume: with ``train.resume: latest`` finished stages (``DONE.json``) and pseudo labels are kept
  and an unfinished stage resumes from its own checkpoints; without it, the run starts afresh.
- Stage epochs: ``train.mutual.stage_a_epochs`` / ``stage_b_epochs`` (default ``train.epochs``);
  ``train.max_steps``, when set, caps each stage.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mosmos.finetune.config import FinetuneConfig
from mosmos.finetune.inference import load_model, save_model
from mosmos.finetune.mutual_pseudo import PseudoLabelled, make_pseudo_labels
from mosmos.finetune.mutual_stage import (
    DONE_FILE,
    PSEUDO,
    STAGE_A,
    STAGE_B,
    STATE_FILE,
    MutualData,
    StageTask,
    load_mutual_data,
    member_spec,
    validation_rows,
)
from mosmos.finetune.patches import PatchDataset, build_train_dataset
from mosmos.io import write_json


def _stage_train(cfg: FinetuneConfig, epochs: int | None):
    train = dataclasses.replace(cfg.train, epochs=epochs or cfg.train.epochs)
    return train


def _run_stage(md: MutualData, accelerator, stage: str, dataset: Dataset, epochs: int | None) -> bool:
    """Train one stage (unless its ``DONE.json`` exists); False when interrupted."""
    from mosmos.engine import Engine

    folder = md.output_dir / stage
    if (folder / DONE_FILE).is_file():
        accelerator.print(f"mutual: {stage} already done ({folder / DONE_FILE})")
        return True
    accelerator.print(f"mutual: {stage}")
    task = StageTask(md, stage, dataset)
    engine = Engine(task, _stage_train(md.cfg, epochs), folder, seed=md.cfg.seed, accelerator=accelerator)
    engine.fit()
    # the next stage prepares its own model and optimizer: accelerate must forget these (its
    # checkpoints hold every prepared object)
    accelerator.free_memory()
    if engine.interrupted:
        return False
    if accelerator.is_main_process:
        write_json(folder / DONE_FILE, {"members": task.state["members"]})
    accelerator.wait_for_everyone()
    return True


def _stage_b_dataset(md: MutualData) -> PatchDataset:
    cfg, data = md.cfg, md.data
    n = len(md.organs)
    tasks = [
        dataclasses.replace(t, lut=np.arange(n + 2, dtype=np.int64)) for t in data.tasks
    ]  # the pseudo maps hold global values already
    return PatchDataset(
        PseudoLabelled(md.cached, md.output_dir / PSEUDO),
        [t for _, t in data.train],
        tasks,
        data.preprocess,
        seed=cfg.seed,
        samples_per_epoch=cfg.data.samples_per_epoch or len(data.train),
        balance=cfg.data.balance,
        foreground_fraction=cfg.data.foreground_fraction,
        augment=cfg.data.augment,
        case_ids=[c.case_id for c, _ in data.train],
        augment_options=cfg.data.augment_options,
    )


def _finalize(md: MutualData, device) -> dict:
    """Write the run's model (best stage B member or their ensemble) with its validation results."""
    from mosmos.finetune.metrics import read_case_csv, summarize, write_case_csv
    from mosmos.models.segmentation.ensemble import EnsembleSegmenter

    out, stage_b = md.output_dir, md.output_dir / STAGE_B
    state = json.loads((stage_b / STATE_FILE).read_text())["members"]
    k_best = max(state, key=lambda k: (state[k]["mean_dice"], -int(k)))
    if md.cfg.train.mutual.final == "best":
        src = stage_b / f"member_{k_best}"
        for name in ("model.safetensors", "model.json", "val_cases.csv"):
            shutil.copyfile(src / name, out / name)
        rows = read_case_csv(out / "val_cases.csv")
        chosen: dict[str, Any] = {"final": "best", "member": int(k_best)}
    else:
        members = [load_model(stage_b / f"member_{k}", device)[0] for k in sorted(state, key=int)]
        first = members[0]
        ensemble = EnsembleSegmenter(
            first.encoder,
            num_classes=first.num_classes,
            num_tasks=first.num_tasks,
            attention_head=first.attention_head,
            member=md.cfg.model.name,
            members=len(members),
            member_decoder=first.decoder_config(),
        )
        for slot, member in zip(ensemble.members, members, strict=True):
            slot.load_state_dict(member.state_dict())
        ensemble.to(device).eval()
        with torch.no_grad():
            rows = validation_rows(md, ensemble, md.organs, device)
        save_model(out, ensemble, member_spec(md, ensemble, md.organs, {"final": "ensemble"}))
        write_case_csv(rows, out / "val_cases.csv")
        chosen = {"final": "ensemble", "members": len(members)}
    summary = summarize(rows)
    best = {"mean_dice": summary["mean_dice"], **chosen, "stage_b": state}
    write_json(out / "best.json", best)
    return {
        k: (None if v != v else float(v)) for k, v in summary.items() if "/" not in k or k.count("/") == 1
    }


def run_mutual(cfg: FinetuneConfig) -> dict:
    """Deep mutual learning end to end (see the module docstring); returns the final model's
    validation metrics (empty when interrupted, or on processes other than the main one)."""
    from mosmos.engine import start_run
    from mosmos.finetune.metrics import format_dice_table, read_case_csv, summarize

    accelerator = start_run(cfg, cfg.train)
    if accelerator.is_main_process and not cfg.train.resume:
        # a run without train.resume starts afresh, as a single-model run does: nothing of an
        # earlier run in this folder (finished stages, pseudo labels, checkpoints) is reused
        for name in (STAGE_A, PSEUDO, STAGE_B):
            shutil.rmtree(Path(cfg.output_dir) / name, ignore_errors=True)
    accelerator.wait_for_everyone()
    md = load_mutual_data(cfg, accelerator)
    mcfg = cfg.train.mutual
    accelerator.print(
        f"stage 2 (mutual): {len(md.data.tasks)} dataset(s), {len(md.organs)} organs, "
        f"{len(md.data.train)} training / {len(md.data.val)} validation cases"
    )
    if not _run_stage(
        md, accelerator, STAGE_A, build_train_dataset(cfg, md.data, md.output_dir), mcfg.stage_a_epochs
    ):
        return {}
    pseudo_done = md.output_dir / PSEUDO / DONE_FILE
    if accelerator.is_main_process and not pseudo_done.is_file():
        quality = make_pseudo_labels(md, accelerator.device)
        write_json(pseudo_done, quality)
        accelerator.print(f"mutual: pseudo labels in {md.output_dir / PSEUDO} (quality.json: {quality})")
    accelerator.wait_for_everyone()
    if not _run_stage(md, accelerator, STAGE_B, _stage_b_dataset(md), mcfg.stage_b_epochs):
        return {}
    if not accelerator.is_main_process:
        return {}
    metrics = _finalize(md, accelerator.device)
    quality = json.loads(pseudo_done.read_text())
    write_json(
        md.output_dir / "metrics.json",
        {
            "best": metrics,
            "pseudo_labels": quality,
            "stage_a": json.loads((md.output_dir / STAGE_A / DONE_FILE).read_text()),
            "stage_b": json.loads((md.output_dir / STAGE_B / DONE_FILE).read_text()),
        },
    )
    print(
        f"stage 2 (mutual) finished: {md.output_dir}/model.safetensors (mean Dice {metrics['mean_dice']:.3f})"
    )
    print(format_dice_table(summarize(read_case_csv(md.output_dir / "val_cases.csv")), md.organs))
    return metrics
