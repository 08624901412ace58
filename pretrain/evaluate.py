"""Stage 1 validation: retrieval, tag AUROC/mAP and the pointing game of pixel-tag attention."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from mosmos.pretrain.metrics import finding_auroc, pointing_game, retrieval_recall, tag_auroc_ap


@torch.no_grad()
def collect_outputs(model, loader: DataLoader, device: torch.device, max_cases: int | None = None) -> dict:
    """Run the pretraining model over ``loader``; stack embeddings, tag logits/targets, attention, labels."""
    keys = ("image_emb", "text_emb", "tag_logits", "attn_maps", "pooled")
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


def organ_presence(labels: torch.Tensor, organ_label_ids: list[int | None]) -> torch.Tensor:
    """``[N, T]`` bool: tag ``t``'s organ is in scan ``n``'s label map (never for an unlabelled tag)."""
    return torch.stack(
        [
            (labels == i).flatten(1).any(1) if i is not None else torch.zeros(len(labels), dtype=torch.bool)
            for i in organ_label_ids
        ],
        dim=1,
    )


def tag_metrics(
    logits: torch.Tensor,
    tags: torch.Tensor,
    organ_names: list[str],
    prefix: str = "tag",
    per_organ: bool = False,
) -> dict:
    """Macro AUROC / AP of ``[N, O, 2]`` (present, abnormal) logits: per kind and over all tags, and
    with ``per_organ`` each tag's AUROC as ``{prefix}_AUROC/{organ}/{kind}``."""
    n = len(tags)
    names = [f"{o}/{kind}" for o in organ_names for kind in ("present", "abnormal")]
    result = tag_auroc_ap(logits.reshape(n, -1).numpy(), tags.long().reshape(n, -1).numpy(), names)
    per_tag = result.get("per_tag", {})
    metrics: dict[str, float] = {}
    for field, label in (("auroc", "AUROC"), ("ap", "AP")):
        for kind in ("present", "abnormal"):
            vals = [v[field] for k, v in per_tag.items() if k.endswith(kind) and v.get(field) is not None]
            if vals:
                metrics[f"{prefix}_{kind}_{label}"] = float(np.mean(vals))
    if per_organ:
        for name, v in per_tag.items():
            if v.get("auroc") is not None:
                metrics[f"{prefix}_AUROC/{name}"] = float(v["auroc"])
    if result.get("mean_auroc") is not None:
        metrics[f"{prefix}_AUROC"] = float(result["mean_auroc"])
    if result.get("mean_ap") is not None:
        metrics[f"{prefix}_mAP"] = float(result["mean_ap"])
    return metrics


def compute_metrics(
    outputs: dict,
    organ_names: list[str],
    organ_label_ids: list[int | None] | None,
    extra_tag_logits: dict[str, torch.Tensor] | None = None,
    spacing: list[float] | None = None,
    tolerance_mm: float = 0.0,
    findings: list[dict] | None = None,
) -> dict:
    """Scalar metrics for ``metrics.json`` from :func:`collect_outputs`.

    ``tag_*`` score the pixel-tag attention's logits; ``extra_tag_logits`` maps a metric prefix to
    other heads' ``[N, O, 2]`` logits (the tag heads on the image embedding and pooled features).
    With ``spacing`` (mm, of the label maps) the pointing game is also scored with a tolerance of
    ``tolerance_mm`` (``pointing_game_tolerant``), with the median distance of the attention peaks to
    their organs (``attention_peak_distance_mm``), overall and per organ. With ``findings`` (ground
    truth per scan, see :func:`mosmos.pretrain.metrics.finding_auroc`) each finding's AUROC of its organ's
    abnormal logit goes in as ``finding_AUROC/<organ>/<finding>``.
    """
    metrics: dict[str, float] = {}
    n = len(outputs["tags"])
    if outputs["text_emb"] is not None:
        recall = retrieval_recall(outputs["image_emb"], outputs["text_emb"], ks=(1, 5, 10))
        metrics.update({k: float(v) for k, v in recall.items()})
        metrics["retrieval_chance_R@1"] = 1.0 / n
    for prefix, logits in (extra_tag_logits or {}).items():
        metrics.update(tag_metrics(logits, outputs["tags"], organ_names, prefix))
    if outputs["tag_logits"] is None:  # contrastive-only ablation: no tag branch
        return metrics
    metrics.update(tag_metrics(outputs["tag_logits"], outputs["tags"], organ_names, "tag", per_organ=True))
    if findings is not None:
        scored = finding_auroc(outputs["tag_logits"][:, :, 1], findings[:n], organ_names)
        metrics.update({f"finding_AUROC/{k}": v for k, v in scored.items()})
    if outputs["labels"] is not None and organ_label_ids is not None:
        labels = outputs["labels"]
        valid = organ_presence(labels, organ_label_ids)
        pg = pointing_game(
            outputs["attn_maps"],
            labels,
            organ_label_ids,
            valid,
            names=organ_names,
            spacing=spacing,
            tolerance_mm=tolerance_mm if spacing is not None else 0.0,
        )
        if pg["pointing_game"] is not None:  # None when no (scan, organ) pair is visible
            metrics["pointing_game"] = float(pg["pointing_game"])
            metrics["attention_border_fraction"] = float(pg["border_fraction"])
            metrics["attention_mass_in_organ"] = float(pg["attention_mass"])
            if pg.get("pointing_tolerant") is not None:
                metrics["pointing_game_tolerant"] = float(pg["pointing_tolerant"])
                metrics["attention_peak_distance_mm"] = float(pg["peak_distance_mm"])
            for name, rate in pg["per_organ"].items():
                if rate is not None:
                    metrics[f"pointing_game/{name}"] = float(rate)
                    metrics[f"attention_mass_in_organ/{name}"] = float(pg["per_organ_mass"][name])
                    if "per_organ_tolerant" in pg:
                        metrics[f"pointing_game_tolerant/{name}"] = float(pg["per_organ_tolerant"][name])
                        metrics[f"attention_peak_distance_mm/{name}"] = float(pg["per_organ_distance"][name])
    return metrics
