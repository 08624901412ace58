"""Stage 1 objectives: image-report InfoNCE (global batch, optional queue) and the organ-tag loss."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mosmos.models.distributed import all_gather_with_grad, gather_sizes, is_distributed, rank_and_world

__all__ = [
    "ClipLoss",
    "TagLoss",
    "attention_equivariance_loss",
    "attention_mask_loss",
    "class_balance_weights",
    "organ_fractions",
]


class ClipLoss(nn.Module):
    """Symmetric InfoNCE between image and report embeddings (Radford et al., "Learning Transferable
    Visual Models From Natural Language Supervision", ICML 2021; ConVIRT, Zhang et al. 2020).

    Negatives: the global batch, gathered from every process with gradients (``gather``), plus
    optionally a FIFO memory queue of past embeddings (He et al., "Momentum Contrast", CVPR 2020),
    which gives small batches many more negatives. Each process computes the loss of its own rows
    against all columns (labels offset by the sizes of the lower ranks' batches), so the mean of
    the per-process losses equals the single-process loss on the global batch and, with DDP's
    gradient averaging, the gradients match it too (see ``mosmos.models.distributed``).

    The queue holds detached embeddings from earlier steps (older weights, and possibly the same
    scan from an earlier epoch), is updated with the gathered global batch after each call in
    training mode only (call ``.eval()`` for validation), and is identical on every process.

    Args:
        gather: gather negatives from all processes when ``torch.distributed`` runs > 1 process.
        queue_size: number of past (image, report) embedding pairs kept as extra negatives (0: off).
        embed_dim: embedding size, to allocate the queue up front (so it is in ``state_dict`` before
            the first call); allocated on the first call when None.

    Example::

        loss_fn = ClipLoss(queue_size=4096, embed_dim=128)
        out = model(image, mask, input_ids, attention_mask)
        loss = loss_fn(out["image_emb"], out["text_emb"], out["logit_scale"])
    """

    def __init__(self, gather: bool = True, queue_size: int = 0, embed_dim: int | None = None) -> None:
        super().__init__()
        if queue_size < 0:
            raise ValueError(f"queue_size={queue_size} must be >= 0")
        if embed_dim is not None and embed_dim < 1:
            raise ValueError(f"embed_dim={embed_dim} must be >= 1")
        self.gather = gather
        self.queue_size = queue_size
        self.register_buffer("queue_image", None)
        self.register_buffer("queue_text", None)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        if queue_size and embed_dim is not None:
            self._allocate_queue(embed_dim, torch.device("cpu"))

    def _allocate_queue(self, embed_dim: int, device: torch.device) -> None:
        self.queue_image = torch.zeros(self.queue_size, embed_dim, device=device)
        self.queue_text = torch.zeros(self.queue_size, embed_dim, device=device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A lazily allocated queue is absent until the first call; allocate it when a checkpoint
        # holds one, so resuming restores the queue instead of failing on "unexpected keys".
        saved = state_dict.get(prefix + "queue_image")
        if self.queue_size and self.queue_image is None and saved is not None:
            self._allocate_queue(saved.shape[1], saved.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_queue(self) -> None:
        """Empty the queue (e.g. after loading weights that make its entries stale)."""
        self.queue_ptr.zero_()
        self.queue_count.zero_()
        if self.queue_image is not None:
            self.queue_image.zero_()
            self.queue_text.zero_()

    @torch.no_grad()
    def _enqueue(self, image: torch.Tensor, text: torch.Tensor) -> None:
        n = image.shape[0]
        if n >= self.queue_size:
            self.queue_image.copy_(image[-self.queue_size :])
            self.queue_text.copy_(text[-self.queue_size :])
            self.queue_ptr.zero_()
            self.queue_count.fill_(self.queue_size)
            return
        idx = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % self.queue_size
        idx = idx.to(self.queue_image.device)
        self.queue_image[idx] = image.to(self.queue_image.dtype)
        self.queue_text[idx] = text.to(self.queue_text.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue_size)
        self.queue_count.clamp_(max=self.queue_size - n).add_(n)

    def forward(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """Loss of this process's rows: ``(CE(image→report) + CE(report→image)) / 2``.

        Args:
            image_emb: ``[B, E]`` L2-normalised image embeddings of this process.
            text_emb: ``[B, E]`` L2-normalised report embeddings, row i paired with image i.
            logit_scale: scalar inverse temperature (already exponentiated).
        """
        if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
            raise ValueError(
                f"image_emb and text_emb must both be [B, E], got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
            )
        n = image_emb.shape[0]
        if self.gather and is_distributed():
            sizes = gather_sizes(n, image_emb.device)
            all_image = all_gather_with_grad(image_emb, sizes)
            all_text = all_gather_with_grad(text_emb, sizes)
            offset = sum(sizes[: rank_and_world()[0]])
        else:
            all_image, all_text, offset = image_emb, text_emb, 0

        image_bank, text_bank = all_image, all_text
        if self.queue_size:
            if self.queue_image is None:
                self._allocate_queue(image_emb.shape[1], image_emb.device)
            elif self.queue_image.device != image_emb.device:
                self.queue_image = self.queue_image.to(image_emb.device)
                self.queue_text = self.queue_text.to(image_emb.device)
            if self.queue_image.shape[1] != image_emb.shape[1]:
                raise ValueError(
                    f"queue holds {self.queue_image.shape[1]}-d embeddings, got {image_emb.shape[1]}-d"
                )
            count = int(self.queue_count)
            if count:
                image_bank = torch.cat([all_image, self.queue_image[:count].to(all_image.dtype)])
                text_bank = torch.cat([all_text, self.queue_text[:count].to(all_text.dtype)])

        labels = torch.arange(n, device=image_emb.device) + offset
        logits_per_image = logit_scale * image_emb @ text_bank.T
        logits_per_text = logit_scale * text_emb @ image_bank.T
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

        if self.queue_size and self.training:
            self._enqueue(all_image.detach(), all_text.detach())
        return loss


def class_balance_weights(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class positive and negative weights from training-set tags ``[N, T, K]`` in {1, 0, -1}.

    Over the non-ignored entries of each class (tag t, output k), positives weigh
    ``n / (2 n_pos)`` and negatives ``n / (2 n_neg)`` (King and Zeng's "balanced" weights): the
    ratio is ``n_neg / n_pos`` and the mean weight over the class's entries is exactly 1. A class
    without positives or without negatives gets weight 1 for both.

    Returns:
        ``(pos_weight, neg_weight)``, each ``[T, K]`` float.
    """
    if targets.ndim != 3:
        raise ValueError(f"targets must be [N, T, K], got {tuple(targets.shape)}")
    n_pos = (targets == 1).sum(dim=0).float()
    n_neg = (targets == 0).sum(dim=0).float()
    total = n_pos + n_neg
    balanced = (n_pos > 0) & (n_neg > 0)
    pos_weight = torch.where(balanced, total / (2 * n_pos.clamp_min(1)), 1.0)
    neg_weight = torch.where(balanced, total / (2 * n_neg.clamp_min(1)), 1.0)
    return pos_weight, neg_weight


class TagLoss(nn.Module):
    """Multi-label tag loss with unknown labels: binary cross-entropy, or the asymmetric loss (ASL:
    Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021).

    Targets are 1 (present), 0 (absent) or -1 (unknown: ignored, exactly zero gradient). The loss is
    the (optionally class-weighted) sum over kept entries divided by their number.

    ASL: ``L+ = -(1 - p)^gamma_pos log p`` and ``L- = -p_m^gamma_neg log(1 - p_m)`` with the shifted
    probability ``p_m = max(p - clip, 0)``; with both gammas and ``clip`` at 0 it is BCE.

    Args:
        kind: ``"bce"`` or ``"asl"``.
        gamma_neg, gamma_pos, clip: ASL focusing and probability margin (ignored for BCE).

    Example::

        pos_w, neg_w = class_balance_weights(train_tags)  # [N, T, K] -> [T, K] each
        loss = TagLoss("asl")(out["tag_logits"], tags, pos_weight=pos_w, neg_weight=neg_w)
    """

    def __init__(
        self,
        kind: Literal["bce", "asl"] = "bce",
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
    ) -> None:
        super().__init__()
        if kind not in ("bce", "asl"):
            raise ValueError(f"kind={kind!r} must be 'bce' or 'asl'")
        if gamma_neg < 0 or gamma_pos < 0:
            raise ValueError(f"gamma_neg={gamma_neg} and gamma_pos={gamma_pos} must be >= 0")
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"clip={clip} must be in [0, 1)")
        self.kind = kind
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip

    def _terms(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-entry losses if the entry were positive, and if it were negative."""
        loss_pos = -F.logsigmoid(logits)
        loss_neg = -F.logsigmoid(-logits)
        if self.kind == "bce":
            return loss_pos, loss_neg
        p = torch.sigmoid(logits)
        p_neg = p
        if self.clip > 0:
            p_neg = (p - self.clip).clamp_min(0.0)
            loss_neg = -torch.log((1.0 - p_neg).clamp_min(1e-8))
        # clamp_min keeps pow's gradient finite at 0 for gammas below 1 (the clamp passes none back).
        if self.gamma_pos > 0:
            loss_pos = loss_pos * (1.0 - p).clamp_min(1e-12).pow(self.gamma_pos)
        if self.gamma_neg > 0:
            loss_neg = loss_neg * p_neg.clamp_min(1e-12).pow(self.gamma_neg)
        return loss_pos, loss_neg

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        pos_weight: torch.Tensor | None = None,
        neg_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean loss over the non-ignored entries (0 with a graph when every entry is ignored).

        Args:
            logits: ``[B, T, K]``.
            targets: ``[B, T, K]`` in {1, 0, -1}.
            pos_weight, neg_weight: optional ``[T, K]`` weights of positive and negative entries,
                e.g. from :func:`class_balance_weights`.
        """
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must match")
        for name, w in (("pos_weight", pos_weight), ("neg_weight", neg_weight)):
            if w is not None and tuple(w.shape) != tuple(logits.shape[1:]):
                raise ValueError(f"{name} must have shape {tuple(logits.shape[1:])}, got {tuple(w.shape)}")
        keep = targets >= 0
        positive = targets > 0
        loss_pos, loss_neg = self._terms(logits)
        if pos_weight is not None:
            loss_pos = loss_pos * pos_weight.to(loss_pos)
        if neg_weight is not None:
            loss_neg = loss_neg * neg_weight.to(loss_neg)
        per_entry = torch.where(positive, loss_pos, loss_neg)
        per_entry = torch.where(keep, per_entry, torch.zeros_like(per_entry))
        return per_entry.sum() / keep.sum().clamp_min(1)


def organ_fractions(labels: torch.Tensor, num_tags: int, grid: tuple[int, ...]) -> torch.Tensor:
    """``[B, num_tags, *grid]``: the share of each attention cell's voxels that lie in each organ.

    Args:
        labels: ``[B, 1, *size]`` label maps whose value ``k + 1`` marks organ tag ``k`` (0: none),
            with ``size`` a whole multiple of ``grid`` (the encoder's stride).
        num_tags: the number of organ tags.
        grid: the attention map's spatial size.
    """
    if labels.ndim < 3 or labels.shape[1] != 1:
        raise ValueError(f"labels must be [B, 1, *size], got {tuple(labels.shape)}")
    onehot = F.one_hot(labels[:, 0].long().clamp(0, num_tags), num_tags + 1)[..., 1:]
    onehot = onehot.movedim(-1, 1).float()  # [B, T, *size]
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(grid)]
    return pool(onehot, tuple(grid))


def attention_mask_loss(
    attn: torch.Tensor, fractions: torch.Tensor, supervised: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Mask supervision of pixel-tag attention (``mosmos+masks``): ``-log`` of the attention mass
    that falls inside the organ, averaged over the supervised (scan, organ) pairs.

    The mass inside is ``sum_c attn[c] * fractions[c]`` over the map's cells ``c``: the share of the
    map inside the organ when each cell's mass is spread evenly over its voxels. The loss is 0 when
    every cell the map attends to lies wholly inside the organ, whatever the map's shape inside it (a
    map may still peak on a lesion), unlike a KL divergence to the normalised mask, which would ask
    for a map spread evenly over the organ. An organ smaller than any cell cannot reach 0: its
    minimum is ``-log(max_c fractions[c])``. Weakly supervised localisation with a few pixel-level
    labels mixed in: e.g. Papandreou et al., "Weakly- and semi-supervised learning of a DCNN for
    semantic image segmentation", ICCV 2015.

    Args:
        attn: ``[B, T, *grid]`` attention maps, each summing to 1 over its cells.
        fractions: ``[B, T, *grid]`` organ share of each cell (:func:`organ_fractions`).
        supervised: ``[B, T]`` bool, the pairs that count (the organ is labelled in that scan's dataset
            and has voxels in it).
        eps: floor of the mass inside (a map with no cell on its organ costs ``-log(eps)``).

    Returns:
        The mean over supervised pairs; a zero that keeps the graph when there is none.

    Example::

        frac = organ_fractions(batch["labels"], num_tags=11, grid=attn.shape[2:])
        loss = attention_mask_loss(attn, frac, batch["mask_organs"] & (frac.flatten(2).sum(-1) > 0))
    """
    if attn.shape != fractions.shape:
        raise ValueError(f"attn {tuple(attn.shape)} and fractions {tuple(fractions.shape)} must match")
    if tuple(supervised.shape) != tuple(attn.shape[:2]):
        raise ValueError(f"supervised must be [B, T]={tuple(attn.shape[:2])}, got {tuple(supervised.shape)}")
    inside = (attn.float() * fractions.float()).flatten(2).sum(-1)  # [B, T]
    keep = supervised.bool()
    if not keep.any():
        return attn.sum() * 0.0
    return -torch.log(inside[keep].clamp_min(eps)).mean()


def attention_equivariance_loss(
    attn: torch.Tensor, attn_of_flipped: torch.Tensor, dims: list[int]
) -> torch.Tensor:
    """Flip equivariance of attention maps: the map of a flipped scan must be the flipped map.

    Mean total-variation distance ``0.5 * sum_c |flip(attn)[c] - attn_of_flipped[c]|`` over the
    ``[B, T]`` maps: 0 for perfectly equivariant maps, 1 for maps with disjoint supports. (The
    equivariance constraint of Wang et al., "Self-supervised Equivariant Attention Mechanism for
    Weakly Supervised Semantic Segmentation", CVPR 2020, with flips as the transformation.)

    Args:
        attn: ``[B, T, *grid]`` maps of the scans.
        attn_of_flipped: ``[B, T, *grid]`` maps of the scans flipped along ``dims``.
        dims: the flipped dimensions of the maps (spatial ones: ``>= 2``).
    """
    if attn.shape != attn_of_flipped.shape:
        raise ValueError(
            f"attn {tuple(attn.shape)} and attn_of_flipped {tuple(attn_of_flipped.shape)} must match"
        )
    if not dims or min(dims) < 2 or max(dims) >= attn.ndim:
        raise ValueError(f"dims={dims} must be spatial dimensions of the [B, T, *grid] maps")
    return 0.5 * (attn.flip(dims) - attn_of_flipped).abs().flatten(2).sum(-1).mean()
