"""The stage 1 objective as one module: the pretraining model plus its losses.

Wrapping model and losses together lets Accelerate/DDP see a single ``forward`` that returns the
named losses, and keeps the contrastive queue (a buffer of the loss) inside the checkpointed state.
"""

from __future__ import annotations

import torch
from torch import nn

from mosmos.models.losses import (
    ClipLoss,
    TagLoss,
    attention_equivariance_loss,
    attention_mask_loss,
    organ_fractions,
)


class PretrainObjective(nn.Module):
    """``forward(batch) -> {"loss", "contrastive", "tags", ...}`` for MOSMOS pretraining.

    Global image–report alignment (symmetric InfoNCE, CLIP) plus multi-label organ recognition
    through pixel-tag attention (MOSMOS, Tian et al. 2023), weighted by the config. A batch that
    mixes in masked scans (``batch["masked"]``, ``mosmos+masks``) scores the contrastive and tag
    terms on its report rows only and adds ``"masks"`` (:func:`attention_mask_loss`) on the others;
    ``equivariance_weight > 0`` adds ``"equivariance"`` in training.
    """

    def __init__(
        self,
        model: nn.Module,
        contrastive_weight: float = 1.0,
        tag_weight: float = 1.0,
        tag_loss: str = "bce",
        queue_size: int = 0,
        pos_weight: torch.Tensor | None = None,
        neg_weight: torch.Tensor | None = None,
        embedding_tag_weight: float = 0.0,
        embed_dim: int = 0,
        num_tags: int = 0,
        pooled_tag_weight: float = 0.0,
        pooled_dim: int = 0,
        mask_weight: float = 1.0,
        equivariance_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.contrastive_weight = contrastive_weight
        self.tag_weight = tag_weight
        self.clip_loss = ClipLoss(gather=True, queue_size=queue_size) if contrastive_weight > 0 else None
        self.tag_loss = TagLoss(kind=tag_loss) if tag_weight > 0 else None
        # One tag classifier shared by the image and the report embedding: both must put the
        # findings in the same directions of the joint space, which anchors the contrastive
        # alignment early and teaches the text encoder to read negations ("no splenomegaly").
        self.embedding_tag_weight = embedding_tag_weight
        self.embedding_tag_head = None
        if embedding_tag_weight > 0 and self.tag_loss is not None:
            self.embedding_tag_head = nn.Linear(embed_dim, num_tags * 2)
        # A linear tag classifier on the encoder's pooled features (a linear probe trained jointly):
        # it trains the encoder fastest, which the attention head and the contrastive term then use.
        self.pooled_tag_weight = pooled_tag_weight
        self.pooled_tag_head = None
        if pooled_tag_weight > 0 and self.tag_loss is not None:
            self.pooled_tag_head = nn.Linear(pooled_dim, num_tags * 2)
        # mosmos+masks: on the masked scans a batch may carry (``batch["masked"]``), the attention mass
        # of each labelled organ must fall inside its mask; those scans have no report
        self.mask_weight = mask_weight
        # variant equivariance: the maps of a flipped batch must be the flipped maps (a second pass)
        self.equivariance_weight = equivariance_weight
        self.register_buffer("pos_weight", pos_weight, persistent=True)
        self.register_buffer("neg_weight", neg_weight, persistent=True)

    def embedding_tag_logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """``[B, T, 2]`` tag logits from unit-norm embeddings (rescaled by sqrt(dim) for the linear head)."""
        logits = self.embedding_tag_head(embedding * embedding.shape[-1] ** 0.5)
        return logits.view(len(embedding), -1, 2)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        use_text = self.clip_loss is not None
        # Rows with a report: every row, unless the batch mixes in masked scans (mosmos+masks), which
        # have no report and so take no part in the contrastive and tag terms.
        masked = batch.get("masked")
        rows = None if masked is None or not bool(masked.any()) else ~masked.bool()
        input_ids, attention_mask, reports = (
            batch.get("input_ids"),
            batch.get("attention_mask"),
            batch.get("report"),
        )
        if rows is not None and use_text:
            keep = rows.to(input_ids.device)
            input_ids, attention_mask = input_ids[keep], attention_mask[keep]
            reports = [r for r, k in zip(reports, rows.tolist(), strict=True) if k]
        out = self.model(
            batch["image"],
            mask=batch["body_mask"],
            input_ids=input_ids if use_text else None,
            attention_mask=attention_mask if use_text else None,
            text_cache_keys=reports if use_text else None,
        )

        def report_rows(x: torch.Tensor) -> torch.Tensor:
            return x if rows is None else x[rows.to(x.device)]

        losses: dict[str, torch.Tensor] = {}
        total = out["image_emb"].new_zeros(())
        image_emb = report_rows(out["image_emb"])
        if self.clip_loss is not None:
            losses["contrastive"] = self.clip_loss(image_emb, out["text_emb"], out["logit_scale"])
            total = total + self.contrastive_weight * losses["contrastive"]
        if self.tag_loss is not None:
            tag_logits = report_rows(out["tag_logits"])
            losses["tags"] = self.tag_loss(
                tag_logits,
                report_rows(batch["tags"].to(tag_logits.device)),
                self.pos_weight,
                self.neg_weight,
            )
            total = total + self.tag_weight * losses["tags"]
        if self.embedding_tag_head is not None:
            tags = report_rows(batch["tags"].to(image_emb.device))
            embeddings = [image_emb, *([out["text_emb"]] if "text_emb" in out else [])]
            losses["embedding_tags"] = sum(
                self.tag_loss(self.embedding_tag_logits(e), tags, self.pos_weight, self.neg_weight)
                for e in embeddings
            ) / len(embeddings)
            total = total + self.embedding_tag_weight * losses["embedding_tags"]
        if self.pooled_tag_head is not None:
            pooled = report_rows(out["pooled"])
            tags = report_rows(batch["tags"].to(pooled.device))
            logits = self.pooled_tag_head(pooled).view(tags.shape)
            losses["pooled_tags"] = self.tag_loss(logits, tags, self.pos_weight, self.neg_weight)
            total = total + self.pooled_tag_weight * losses["pooled_tags"]
        if rows is not None and "attn_maps" in out:
            losses["masks"] = self.mask_term(out["attn_maps"], batch, ~rows)
            total = total + self.mask_weight * losses["masks"]
        if self.equivariance_weight > 0 and self.training and "attn_maps" in out:
            losses["equivariance"] = self.equivariance_term(out["attn_maps"], batch)
            total = total + self.equivariance_weight * losses["equivariance"]
        losses["loss"] = total
        return losses

    @staticmethod
    def mask_term(attn: torch.Tensor, batch: dict, masked: torch.Tensor) -> torch.Tensor:
        """:func:`attention_mask_loss` on the masked rows: over each organ their dataset labels that
        has voxels in the scan and in the cells the attention can reach."""
        sel = masked.to(attn.device)
        maps = attn[sel]
        fractions = organ_fractions(
            batch["labels"][sel.to(batch["labels"].device)].to(attn.device),
            maps.shape[1],
            tuple(maps.shape[2:]),
        )
        reachable = (maps.sum(1, keepdim=True) > 0).to(fractions.dtype)  # cells inside the body's reach
        present = (fractions * reachable).flatten(2).sum(-1) > 0
        supervised = batch["mask_organs"].to(attn.device)[sel].bool() & present
        return attention_mask_loss(maps, fractions, supervised)

    def equivariance_term(self, attn: torch.Tensor, batch: dict) -> torch.Tensor:
        """:func:`attention_equivariance_loss` under a flip along a random non-empty set of axes."""
        image, body = batch["image"], batch["body_mask"]
        n = image.ndim - 2
        code = int(torch.randint(1, 2**n, ()))  # the global generator: seeded and resumed by the engine
        dims = [2 + i for i in range(n) if code >> i & 1]
        flipped = self.model.image_encoder(image.flip(dims), body.flip(dims))
        _, attn_flipped = self.model.tag_head(flipped["features"], body.flip(dims))
        return attention_equivariance_loss(attn, attn_flipped, dims)
