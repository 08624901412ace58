"""Stage 1 validation: retrieval, tag AUROC/mAP and the pointing game of pixel-tag attention."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from pretrain.metrics import pointing_game, retrieval_recall, tag_auroc_ap


@torch.no_grad()
def collect_outputs(model, loader: DataLoader, device: torch.device, max_cases: int | None = None) -> dict:
    """Run the pretraining model over ``loader``; stack embeddings, tag logits/targets, attention, labels."""
    keys = ("image_emb", "text_emb", "tag_logits", "attn_maps")
    acc: dict[str, list] = {k: [] for k in (*keys, "tags", "labels", "image", "body_mask")}
    seen = 0
    for batch in loader:
        has_text = getattr(model, "text_encoder", None) is not None
        out = model(
            batch["image"].to(device),
            mask=batch["body_mask"].to(device),
            input_ids=batch["input_ids"].to(device) if has_text else None,
            attention_mask=batch["attention_mask"].to(device) if has_text else None,
        )
        for k in keys:
            if out.get(k) is not None:
                acc[k].append(out[k].float().cpu())
        acc["tags"].append(batch["tags"].cpu())
        acc["image"].append(batch["image"].cpu())
        acc["body_mask"].append(batch["body_mask"].cpu())
        if "labels" in batch:
            acc["labels"].append(batch["labels"].cpu())
        seen += len(batch["image"])
        if max_cases is not None and seen >= max_cases:
            break
    return {k: torch.cat(v)[:max_cases] if v else None for k, v in acc.items()}


def compute_metrics(outputs: dict, organ_names: list[str], organ_label_ids: list[int | None] | None) -> dict:
    """Scalar metrics for ``metrics.json`` from :func:`collect_outputs`."""
    metrics: dict[str, float] = {}
    n = len(outputs["tags"])
    if outputs["text_emb"] is not None:
        recall = retrieval_recall(outputs["image_emb"], outputs["text_emb"], ks=(1, 5, 10))
        metrics.update({k: float(v) for k, v in recall.items()})
        metrics["retrieval_chance_R@1"] = 1.0 / n
    if outputs["tag_logits"] is None:  # contrastive-only ablation: no tag branch
        return metrics
    logits = outputs["tag_logits"]  # [N, O, 2]: present, abnormal
    targets = outputs["tags"].long()
    names = [f"{o}/{kind}" for o in organ_names for kind in ("present", "abnormal")]
    tag_metrics = tag_auroc_ap(logits.reshape(n, -1).numpy(), targets.reshape(n, -1).numpy(), names)
    per_tag = tag_metrics.get("per_tag", {})

    def macro(kind: str, field: str) -> float | None:
        vals = [v[field] for k, v in per_tag.items() if k.endswith(kind) and v.get(field) is not None]
        return float(np.mean(vals)) if vals else None

    for field, label in (("auroc", "AUROC"), ("ap", "AP")):
        for kind in ("present", "abnormal"):
            value = macro(kind, field)
            if value is not None:
                metrics[f"tag_{kind}_{label}"] = value
    for key in ("mean_auroc", "mean_ap"):
        if tag_metrics.get(key) is not None:
            metrics["tag_AUROC" if key == "mean_auroc" else "tag_mAP"] = float(tag_metrics[key])
    if outputs["labels"] is not None and organ_label_ids is not None:
        labels = outputs["labels"]
        valid = torch.stack(
            [
                (labels == i).flatten(1).any(1) if i is not None else torch.zeros(n, dtype=torch.bool)
                for i in organ_label_ids
            ],
            dim=1,
        )
        pg = pointing_game(outputs["attn_maps"], labels, organ_label_ids, valid)
        if pg["pointing_game"] is not None:  # None when no (scan, organ) pair is visible
            metrics["pointing_game"] = float(pg["pointing_game"])
            metrics["attention_border_fraction"] = float(pg["border_fraction"])
    return metrics
