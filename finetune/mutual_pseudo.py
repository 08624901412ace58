"""Deep mutual learning's pseudo labels and their quality report (see :mod:`mosmos.finetune.mutual`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mosmos.finetune.inference import Predictor, load_model
from mosmos.finetune.mutual_stage import PSEUDO, STAGE_A, MutualData, member_spec
from mosmos.io import write_json
from mosmos.vocabulary import load_vocabulary


class PseudoLabelled(Dataset):
    """The cached training cases with ``label`` replaced by their pseudo-labelled maps (global label
    values, ``C + 1`` ignored)."""

    def __init__(self, cached: Dataset, folder: Path) -> None:
        self.cached, self.folder = cached, folder

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.cached[i])
        item["label"] = torch.as_tensor(np.load(self.folder / f"{i:06d}.npy").astype(np.int64))[None]
        return item


def _window_probabilities(md: MutualData, members: list[tuple[nn.Module, list[str]]], x, task, device):
    """Per member: its organ probabilities ``[C_k, *S]`` on the preprocessed input ``x``."""
    cfg = md.cfg
    out = []
    for model, organs in members:
        spec = member_spec(md, model, organs)
        predictor = Predictor(
            model, spec, device, overlap=cfg.eval.overlap, sw_batch_size=cfg.eval.sw_batch_size
        )
        out.append(predictor.window_probabilities(x.to(device), task))
    return out


def _peer_probabilities(md: MutualData, probs_by_member: list[torch.Tensor], skip: int | None):
    """Organ probabilities ``[C, *S]`` averaged over the members (but ``skip``) segmenting each organ,
    and which organs some such member segments."""
    organs = md.organs
    shape = probs_by_member[0].shape[1:]
    total = torch.zeros((len(organs), *shape))
    count = torch.zeros(len(organs))
    for k, p in enumerate(probs_by_member):
        if k == skip:
            continue
        for i, o in enumerate(md.member_organs(STAGE_A)[k]):
            total[organs.index(o)] += p[i]
            count[organs.index(o)] += 1
    return total / count.clamp_min(1).view(-1, *([1] * len(shape))), count > 0


def _dice(pred: torch.Tensor, gt: torch.Tensor) -> float:
    denom = int(pred.sum()) + int(gt.sum())
    return float("nan") if denom == 0 else 2.0 * int((pred & gt).sum()) / denom


def make_pseudo_labels(md: MutualData, device) -> dict[str, Any]:
    """Pseudo-label every training case with stage A's best members; score them; return the summary."""
    from mosmos.models.mutual_losses import ignore_index, merge_pseudo_labels
    from mosmos.transforms import BODY_MASK_KEY

    cfg, data = md.cfg, md.data
    mcfg = cfg.train.mutual
    folder = md.output_dir / PSEUDO
    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for k in range(len(data.tasks)):
        model, spec = load_model(md.output_dir / STAGE_A / f"member_{k}", device)
        members.append((model, spec.organs))
    n = len(md.organs)
    rows: list[dict] = []
    counts = np.zeros(n + 2, dtype=np.int64)
    for i, (case, ti) in enumerate(data.train):
        task = data.tasks[ti]
        item = md.cached[i]
        image = torch.as_tensor(item["image"]).float()
        body = torch.as_tensor(item[BODY_MASK_KEY]).float()
        label = torch.as_tensor(task.lut, dtype=torch.long)[torch.as_tensor(item["label"]).long()][0]
        x = torch.cat([image, body], 0)[None]
        probs = _window_probabilities(md, members, x, ti, device)
        labelled = torch.tensor(task.labelled)
        peer, predicted = _peer_probabilities(md, probs, skip=ti)
        pseudo = merge_pseudo_labels(label, labelled, peer, predicted, mcfg.pseudo_high, mcfg.pseudo_low)
        np.save(folder / f"{i:06d}.npy", pseudo.numpy().astype(np.uint8 if n + 1 < 256 else np.int16))
        counts += np.bincount(pseudo.flatten().numpy(), minlength=n + 2)
        # held-out labels: the organs this dataset labels, pseudo-labelled as if it did not
        hidden = merge_pseudo_labels(
            torch.zeros_like(label),
            torch.zeros(n, dtype=torch.bool),
            peer,
            predicted,
            mcfg.pseudo_high,
            mcfg.pseudo_low,
        )
        for c, organ in enumerate(md.organs):
            if task.labelled[c] and predicted[c]:
                rows.append(
                    _quality_row("held_out_labels", task.name, case.case_id, organ, hidden, label, c, n)
                )
    if mcfg.quality_data:
        rows += _ground_truth_quality(md, members, device)
    return _write_quality(md, folder, rows, counts, ignore_index(n))


def _quality_row(source, dataset, case, organ, pseudo, truth, c, n) -> dict:
    from mosmos.models.mutual_losses import ignore_index

    gt = truth == c + 1
    ignored = pseudo == ignore_index(n)
    return {
        "source": source,
        "dataset": dataset,
        "case": case,
        "organ": organ,
        "dice": _dice(pseudo == c + 1, gt),
        "ignored_in_organ": float(ignored[gt].float().mean()) if bool(gt.any()) else float("nan"),
        "gt_voxels": int(gt.sum()),
        "pseudo_voxels": int((pseudo == c + 1).sum()),
    }


def _ground_truth_quality(md: MutualData, members, device) -> list[dict]:
    """Each case of ``train.mutual.quality_data`` pseudo-labelled as if it belonged to each training
    dataset, scored on the organs that dataset does not label."""
    from mosmos.models.mutual_losses import merge_pseudo_labels
    from mosmos.segdata.dataset import read_seg_dataset
    from mosmos.transforms import BODY_MASK_KEY, build_preprocess

    cfg, data = md.cfg, md.data
    mcfg = cfg.train.mutual
    ds = read_seg_dataset(mcfg.quality_data, load_vocabulary(cfg.data.vocabulary))
    lut = torch.as_tensor(ds.lookup_table(md.organs), dtype=torch.long)
    chain = build_preprocess(data.preprocess, ("image",), ("label",))
    n = len(md.organs)
    rows = []
    for case in [c for c in [*ds.train, *ds.test] if c.label is not None]:
        item = chain({"image": case.image, "label": case.label})
        truth = lut[torch.as_tensor(item["label"]).long()][0]
        x = torch.cat(
            [torch.as_tensor(item["image"]).float(), torch.as_tensor(item[BODY_MASK_KEY]).float()], 0
        )[None]
        for task in data.tasks:
            probs = _window_probabilities(md, members, x, task.index, device)
            peer, predicted = _peer_probabilities(md, probs, skip=task.index)
            labelled = torch.tensor(task.labelled)
            label = torch.where(labelled[(truth - 1).clamp_min(0)] & (truth > 0), truth, 0)
            pseudo = merge_pseudo_labels(label, labelled, peer, predicted, mcfg.pseudo_high, mcfg.pseudo_low)
            for c, organ in enumerate(md.organs):
                if not task.labelled[c] and organ in ds.organs:
                    rows.append(
                        _quality_row("ground_truth", task.name, case.case_id, organ, pseudo, truth, c, n)
                    )
    return rows


def _write_quality(md: MutualData, folder: Path, rows: list[dict], counts: np.ndarray, ignore: int) -> dict:
    columns = ["source", "dataset", "case", "organ", "dice", "ignored_in_organ", "gt_voxels", "pseudo_voxels"]
    with open(folder / "quality.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    summary: dict[str, Any] = {}
    for source in sorted({r["source"] for r in rows}):
        per_organ = {}
        for organ in md.organs:
            values = [
                r["dice"]
                for r in rows
                if r["source"] == source and r["organ"] == organ and r["dice"] == r["dice"]
            ]
            if values:
                per_organ[organ] = float(np.mean(values))
        summary[source] = {
            "dice": per_organ,
            "mean_dice": float(np.mean(list(per_organ.values()))) if per_organ else None,
        }
    total = max(1, int(counts.sum()))
    summary["voxels"] = {
        "ignored_fraction": float(counts[ignore]) / total,
        "per_organ_fraction": {o: float(counts[i + 1]) / total for i, o in enumerate(md.organs)},
    }
    write_json(folder / "quality.json", summary)
    return summary
