"""Deep mutual learning's cohorts and their engine task (see :mod:`mosmos.finetune.mutual`).

:class:`Cohort` trains several segmenters side by side; :class:`StageTask` is what the engine runs
for stage A (partial-organ models) and stage B (full-organ models); :func:`validation_rows` scores
one model on the validation cases.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mosmos.errors import ConfigError
from mosmos.finetune.config import FinetuneConfig
from mosmos.finetune.data import SegData, build_seg_data, load_preprocess
from mosmos.finetune.inference import ModelSpec, Predictor, decode_probabilities, save_model
from mosmos.finetune.patches import cached_train_cases
from mosmos.io import write_json
from mosmos.vocabulary import load_vocabulary

STRATEGY = "mutual"
STAGE_A, STAGE_B, PSEUDO = "stage_a", "stage_b", "pseudo_labels"
DONE_FILE = "DONE.json"
STATE_FILE = "members.json"


# ------------------------------------------------------------------------------------ the cohort
class Cohort(nn.Module):
    """Models trained side by side; ``forward`` returns each one's logits and last decoder features
    (the input of its output block ``out``, captured by a hook)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        for m in members:
            if not isinstance(getattr(m, "out", None), nn.Module):
                raise ConfigError(
                    f"train.strategy=mutual needs segmenters with an output block 'out'; {type(m)}"
                )
        self.members = nn.ModuleList(members)

    def forward(
        self, x: torch.Tensor, task: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, feats = [], []
        for m in self.members:
            captured: dict[str, torch.Tensor] = {}
            handle = m.out.register_forward_pre_hook(lambda _, inp, c=captured: c.__setitem__("f", inp[0]))
            try:
                logits.append(m(x, task=task, mask=mask))
            finally:
                handle.remove()
            feats.append(captured["f"])
        return logits, feats


@dataclasses.dataclass
class MutualData:
    """What both stages share: the datasets, the cached training cases, the channel bookkeeping."""

    cfg: FinetuneConfig
    data: SegData
    cached: Dataset
    output_dir: Path

    @property
    def organs(self) -> list[str]:
        return self.data.organs

    def member_organs(self, stage: str) -> list[list[str]]:
        """Organs of each member: its dataset's (stage A) or all of them (stage B)."""
        if stage == STAGE_A:
            return [[o for o in self.organs if o in t.organs] for t in self.data.tasks]
        return [list(self.organs) for _ in self.data.tasks]

    def to_local(self, organs: list[str]) -> torch.Tensor:
        """``[C + 1]``: global label value (0, 1 + output channel) -> member label value (0 if absent)."""
        lut = torch.zeros(len(self.organs) + 1, dtype=torch.long)
        for i, o in enumerate(organs):
            lut[self.organs.index(o) + 1] = i + 1
        return lut


def load_mutual_data(cfg: FinetuneConfig, accelerator) -> MutualData:
    vocab = load_vocabulary(cfg.data.vocabulary)
    preprocess = load_preprocess(cfg)
    with accelerator.main_process_first():
        data = build_seg_data(cfg, vocab)
    if accelerator.is_main_process and cfg.data.on_bad_case == "skip":
        from mosmos.check.report import write_problems_csv

        write_problems_csv(Path(cfg.output_dir) / "skipped.csv", data.skipped)
    data.preprocess = preprocess
    output_dir = Path(cfg.output_dir)
    return MutualData(cfg, data, cached_train_cases(cfg, data, output_dir), output_dir)


def build_member(cfg: FinetuneConfig, num_classes: int, num_tasks: int) -> nn.Module:
    from mosmos.finetune.pretrained import build_segmenter

    model, _ = build_segmenter(
        cfg.model.name,
        num_classes=num_classes,
        num_tasks=num_tasks,
        init=cfg.model.init,
        encoder=cfg.model.encoder,
        encoder_kwargs=cfg.model.encoder_kwargs,
        use_attention_maps=cfg.model.attention_maps,
        decoder_kwargs=cfg.model.decoder_kwargs,
        img_size=tuple(cfg.data.patch_size),
    )
    return model


def member_spec(md: MutualData, model: nn.Module, organs: list[str], extra: dict | None = None) -> ModelSpec:
    """The ``model.json`` of one member (or of the final model)."""
    from mosmos.finetune.data import organ_tasks

    cfg, data = md.cfg, md.data
    base = model.members[0] if hasattr(model, "members") else model
    head = base.attention_head.head_config() if base.attention_head is not None else None
    return ModelSpec(
        name="ensemble" if base is not model else cfg.model.name,
        encoder=base.encoder.model_name,
        encoder_kwargs=base.encoder.encoder_config(),
        decoder=model.decoder_config(),
        attention_head=head,
        organs=list(organs),
        tasks=[{"name": t.name, "organs": t.organs} for t in data.tasks],
        organ_task={o: t for o, t in organ_tasks(data).items() if o in organs},
        strategy=STRATEGY,
        preprocess=data.preprocess.to_dict(),
        extra={"init": cfg.model.init, "attention_maps": cfg.model.attention_maps, "mutual": extra or {}},
    )


def validation_rows(md: MutualData, model: nn.Module, organs: list[str], device) -> list[dict]:
    """Per case and organ Dice / HD95 of one model on the validation cases, for the organs it
    segments that the case's dataset labels (in the case's original geometry)."""
    from mosmos.finetune.data import load_label
    from mosmos.finetune.metrics import case_metrics

    cfg, data = md.cfg, md.data
    spec = member_spec(md, model, organs)
    predictor = Predictor(model, spec, device, overlap=cfg.eval.overlap, sw_batch_size=cfg.eval.sw_batch_size)
    to_local = md.to_local(organs).numpy()
    rows, per_task = [], {}
    for case, ti in data.val:
        task = data.tasks[ti]
        scored = [o for o in task.organs if o in organs]
        per_task[ti] = per_task.get(ti, 0) + 1
        if not scored or (cfg.eval.max_cases is not None and per_task[ti] > cfg.eval.max_cases):
            continue
        probs, _ = predictor.probabilities(case.image, task=ti)
        pred = decode_probabilities(probs, STRATEGY)
        label, spacing = load_label(case.label, to_local[task.lut], task.name)
        for row in case_metrics(pred, label, organs, scored, spacing, cfg.eval.hd95):
            rows.append({"dataset": task.name, "case": case.case_id, **row})
    return rows


def organ_dice(summary: dict[str, float], organs: list[str]) -> dict[str, float]:
    """Per organ, the mean over datasets of ``dice/<dataset>/<organ>`` (NaN-free organs only)."""
    out: dict[str, list[float]] = {}
    for key, value in summary.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "dice" and parts[2] in organs and value == value:
            out.setdefault(parts[2], []).append(float(value))
    return {o: float(np.mean(v)) for o, v in out.items()}


# ------------------------------------------------------------------------------ the stage task
class StageTask:
    """The engine's task for one stage: a :class:`Cohort`, a patch stream, the stage's loss step and
    per-member validation (each member keeps its best weights in ``member_<k>/``)."""

    monitor = "mean_dice"  # what train.early_stopping_patience watches: the members' mean

    def __init__(self, md: MutualData, stage: str, train_dataset: Dataset) -> None:
        from mosmos.models.mutual_losses import IgnoreBCEDiceLoss
        from mosmos.models.seg_losses import MaskedBCEDiceLoss

        cfg = md.cfg
        self.md, self.stage, self.cfg = md, stage, cfg
        self.dir = md.output_dir / stage
        self.mcfg = cfg.train.mutual
        self.organs = md.member_organs(stage)
        n_tasks = len(md.data.tasks)
        self.model = Cohort([build_member(cfg, len(o), n_tasks) for o in self.organs])
        self.train_dataset = train_dataset
        self.collate_fn = None
        prefixes = [
            f"members.{k}.{p}" for k in range(len(self.organs)) for p in ("encoder.", "attention_head.")
        ]
        self.lr_scale = dict.fromkeys(prefixes, cfg.train.encoder_lr_scale)
        self.freeze_steps = dict.fromkeys(prefixes, cfg.train.freeze_encoder_steps)
        self.rewarm_steps = cfg.train.rewarm_steps
        self.masked = MaskedBCEDiceLoss(bce_weight=cfg.train.bce_weight, dice_weight=cfg.train.dice_weight)
        self.ignoring = IgnoreBCEDiceLoss(bce_weight=cfg.train.bce_weight, dice_weight=cfg.train.dice_weight)
        self.to_local = [md.to_local(o) for o in self.organs]
        self.channels = [torch.tensor([md.organs.index(o) for o in organs]) for organs in self.organs]
        state_path = self.dir / STATE_FILE
        self.state = (
            json.loads(state_path.read_text()) if state_path.is_file() else {"members": {}, "latest": {}}
        )

    # -- training ------------------------------------------------------------------------------
    def step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits, feats = model(batch["image"], task=batch["task"], mask=batch["body_mask"])
        label = batch["label"][:, 0].long()
        if self.stage == STAGE_A:
            return self._step_a(logits, feats, label, batch["labelled"].bool())
        return self._step_b(logits, feats, label, batch["labelled"].bool(), batch["task"])

    def _step_a(self, logits, feats, label, labelled) -> dict[str, torch.Tensor]:
        from mosmos.models.mutual_losses import feature_difference_loss, prediction_difference_loss
        from mosmos.models.seg_loss_terms import _one_hot_organs

        terms = {"sup": 0.0, "pred_diff": 0.0, "feat_diff": 0.0}
        total = 0.0
        n_organs = len(self.md.organs)
        for k, (lk, fk) in enumerate(zip(logits, feats, strict=True)):
            to_local = self.to_local[k].to(label.device)
            channels = self.channels[k].to(label.device)
            target = to_local[label]
            lab = labelled[:, channels]
            sup = self.masked(lk, target, lab)
            in_k = to_local > 0
            other = (label > 0) & ~in_k[label]
            pd = prediction_difference_loss(lk, other)
            expand = (slice(None), slice(None), *([None] * (label.ndim - 1)))
            own_true = _one_hot_organs(target, len(channels), torch.float32).bool() & lab[expand]
            own_pred = (torch.sigmoid(lk.detach().float()) > 0.5) & ~lab[expand]
            outside = torch.ones(n_organs, dtype=torch.bool, device=label.device)
            outside[channels] = False
            other_regions = _one_hot_organs(label, n_organs, torch.float32).bool()[:, outside]
            fd = feature_difference_loss(fk, own_true | own_pred, other_regions)
            total = total + sup + self.mcfg.prediction_difference * pd + self.mcfg.feature_difference * fd
            for name, v in (("sup", sup), ("pred_diff", pd), ("feat_diff", fd)):
                terms[name] = terms[name] + v.detach() / len(logits)
        return {"loss": total, **terms}

    def _step_b(self, logits, feats, label, labelled, task) -> dict[str, torch.Tensor]:
        from mosmos.models.mutual_losses import (
            feature_similarity_loss,
            ignore_index,
            mutual_consistency_loss,
        )
        from mosmos.models.seg_loss_terms import _one_hot_organs

        n_organs = len(self.md.organs)
        ignore = ignore_index(n_organs)
        spatial = (None,) * (label.ndim - 1)
        true_only = torch.where(label == ignore, 0, label)  # the other datasets' images: true labels only
        sup_total = 0.0
        for k, lk in enumerate(logits):
            own = task.long() == k
            target = torch.where(own[(slice(None), *spatial)], label, true_only)
            channels = own.view(-1, 1) | labelled
            sup_total = sup_total + self.ignoring(lk, target, channels)
        cons = mutual_consistency_loss(logits)
        masks = _one_hot_organs(true_only, n_organs, torch.float32).bool()
        best = torch.tensor(self.best_member(), dtype=torch.long, device=label.device)
        fs = feature_similarity_loss(feats, masks, best)
        k = len(logits)
        total = sup_total + k * (self.mcfg.consistency * cons + self.mcfg.feature_similarity * fs)
        return {
            "loss": total,
            "sup": sup_total.detach() / k,
            "consistency": cons.detach(),
            "feat_sim": fs.detach(),
        }

    def best_member(self) -> list[int]:
        """Per organ, the member with the best Dice at the latest evaluation (-1: not evaluated yet)."""
        latest = self.state["latest"]
        out = []
        for organ in self.md.organs:
            scores = [(latest.get(str(k), {}).get(organ, -1.0), -k) for k in range(len(self.organs))]
            value, neg_k = max(scores)
            out.append(-neg_k if value >= 0 else -1)
        return out

    # -- validation ----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        from mosmos.finetune.metrics import summarize, write_case_csv

        device = next(model.parameters()).device
        metrics: dict[str, float] = {}
        means = []
        for k, member in enumerate(model.members):
            rows = validation_rows(self.md, member, self.organs[k], device)
            summary = summarize(rows)
            mean = summary["mean_dice"]
            self.state["latest"][str(k)] = organ_dice(summary, self.organs[k])
            best = self.state["members"].get(str(k))
            if best is None or (mean == mean and mean > best["mean_dice"]):
                target = self.dir / f"member_{k}"
                target.mkdir(parents=True, exist_ok=True)
                spec = member_spec(self.md, member, self.organs[k], {"stage": self.stage, "member": k})
                save_model(target, member, spec)
                write_case_csv(rows, target / "val_cases.csv")
                self.state["members"][str(k)] = {"mean_dice": mean if mean == mean else -1.0, "epoch": epoch}
            metrics[f"mean_dice/member_{k}"] = None if mean != mean else float(mean)
            means.append(mean)
        write_json(self.dir / STATE_FILE, self.state)
        kept = [m for m in means if m == m]
        metrics["mean_dice"] = float(np.mean(kept)) if kept else None
        return metrics
