"""The stage 1 objective as one module: the pretraining model plus its losses.

Wrapping model and losses together lets Accelerate/DDP see a single ``forward`` that returns the
named losses, and keeps the contrastive queue (a buffer of the loss) inside the checkpointed state.
"""

from __future__ import annotations

import torch
from torch import nn

from mosmos.models.losses import ClipLoss, TagLoss


class PretrainObjective(nn.Module):
    """``forward(batch) -> {"loss", "contrastive", "tags"}`` for MOSMOS pretraining.

    Global image–report alignment (symmetric InfoNCE, CLIP) plus multi-label organ recognition
    through pixel-tag attention (MOSMOS, Tian et al. 2023), weighted by the config.
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
        self.register_buffer("pos_weight", pos_weight, persistent=True)
        self.register_buffer("neg_weight", neg_weight, persistent=True)

    def embedding_tag_logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """``[B, T, 2]`` tag logits from unit-norm embeddings (rescaled by sqrt(dim) for the linear head)."""
        logits = self.embedding_tag_head(embedding * embedding.shape[-1] ** 0.5)
        return logits.view(len(embedding), -1, 2)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        use_text = self.clip_loss is not None
        out = self.model(
            batch["image"],
            mask=batch["body_mask"],
            input_ids=batch.get("input_ids") if use_text else None,
            attention_mask=batch.get("attention_mask") if use_text else None,
            text_cache_keys=batch.get("report") if use_text else None,
        )
        losses: dict[str, torch.Tensor] = {}
        total = out["image_emb"].new_zeros(())
        if self.clip_loss is not None:
            losses["contrastive"] = self.clip_loss(out["image_emb"], out["text_emb"], out["logit_scale"])
            total = total + self.contrastive_weight * losses["contrastive"]
        if self.tag_loss is not None:
            losses["tags"] = self.tag_loss(
                out["tag_logits"],
                batch["tags"].to(out["tag_logits"].device),
                self.pos_weight,
                self.neg_weight,
            )
            total = total + self.tag_weight * losses["tags"]
        if self.embedding_tag_head is not None:
            tags = batch["tags"].to(out["image_emb"].device)
            embeddings = [out["image_emb"], *([out["text_emb"]] if "text_emb" in out else [])]
            losses["embedding_tags"] = sum(
                self.tag_loss(self.embedding_tag_logits(e), tags, self.pos_weight, self.neg_weight)
                for e in embeddings
            ) / len(embeddings)
            total = total + self.embedding_tag_weight * losses["embedding_tags"]
        if self.pooled_tag_head is not None:
            tags = batch["tags"].to(out["pooled"].device)
            logits = self.pooled_tag_head(out["pooled"]).view(tags.shape)
            losses["pooled_tags"] = self.tag_loss(logits, tags, self.pos_weight, self.neg_weight)
            total = total + self.pooled_tag_weight * losses["pooled_tags"]
        losses["loss"] = total
        return losses
