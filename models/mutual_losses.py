"""Losses and the pseudo-label merge of deep mutual learning among partially labelled datasets.

Liu et al., "Deep Mutual Learning among Partially Labeled Datasets for Multi-Organ Segmentation"
(arXiv:2407.12611). Pure torch, no I/O; the two-stage training that uses them is
:mod:`mosmos.finetune.mutual`.

Conventions (those of :mod:`mosmos.models.seg_losses`): organ logits ``[B, C, *S]``, one sigmoid per
organ; label maps ``[B, *S]`` with 0 background and ``k`` organ ``k - 1``. A pseudo-labelled map may
also hold ``C + 1`` (:func:`ignore_index`): voxels no loss looks at.

- Stage A (partial-organ models, one per dataset): :func:`prediction_difference_loss` pushes a
  model's organ probabilities to 0 on voxels the image's dataset labels as organs the model does
  not segment; :func:`feature_difference_loss` keeps the prototypes of the model's organs apart from
  those of the other organs (cosine similarity above 0 is penalised).
- Pseudo labels: :func:`merge_pseudo_labels` (true labels always win; confident predictions of the
  other models elsewhere; an ignore band between two thresholds).
- Stage B (full-organ models): :class:`IgnoreBCEDiceLoss` (BCE + soft Dice with per-voxel ignore and
  per-sample channel masks), :func:`mutual_consistency_loss` (Bernoulli KL towards each peer, the
  peer detached: deep mutual learning, Zhang et al. 2018) and :func:`feature_similarity_loss` (each
  organ's prototype pulled towards the currently most accurate model's, stop-gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mosmos.models.seg_loss_terms import _expand, _one_hot_organs, _soft_dice_loss, _upcast

__all__ = [
    "IgnoreBCEDiceLoss",
    "feature_difference_loss",
    "feature_similarity_loss",
    "ignore_index",
    "merge_pseudo_labels",
    "mutual_consistency_loss",
    "organ_prototypes",
    "prediction_difference_loss",
]


def ignore_index(num_organs: int) -> int:
    """The label value that marks an ignored voxel in a pseudo-labelled map of ``num_organs`` organs."""
    return int(num_organs) + 1


def _zero(t: torch.Tensor) -> torch.Tensor:
    """A zero scalar still connected to ``t`` (so backward runs and gives exactly zero gradient)."""
    return (t * 0).sum()


def prediction_difference_loss(logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean BCE towards 0 of a partial-organ model's organ channels on the voxels of other organs.

    On an image of dataset ``j``, ``other`` marks the voxels ``j`` labels as organs that model ``k``
    does not segment; none of ``k``'s organs can be there, so each of its channels is pushed to
    background::

        loss = sum_{b, c, v in other_b} softplus(logit[b, c, v]) / (C_k * |other|)

    (``softplus(x) = -log(1 - sigmoid(x))``, the BCE of ``x`` against 0). 0 when ``other`` is empty.

    Args:
        logits: ``[B, C_k, *S]`` logits of model ``k``'s organs.
        other: ``[B, *S]`` or ``[B, 1, *S]`` bool.
    """
    logits = _upcast(logits)
    if other.ndim == logits.ndim:
        other = other[:, 0]
    if tuple(other.shape) != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"other {tuple(other.shape)} does not match logits {tuple(logits.shape)}")
    mask = other.bool().unsqueeze(1).expand_as(logits)
    vals = torch.where(mask, F.softplus(torch.where(mask, logits, torch.zeros_like(logits))), 0.0)
    count = mask.sum()
    if int(count) == 0:
        return _zero(logits)
    return vals.sum() / count


def organ_prototypes(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling: the mean feature vector of each region.

    Args:
        features: ``[B, F, *S]``.
        masks: ``[B, M, *S]`` bool or weights in [0, 1].

    Returns:
        ``prototypes [B, M, F]`` (zeros for an empty region) and ``valid [B, M]`` (region not empty).
    """
    if masks.shape[0] != features.shape[0] or masks.shape[2:] != features.shape[2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match features {tuple(features.shape)}")
    f = _upcast(features).flatten(2)  # [B, F, V]
    w = masks.to(f.dtype).flatten(2)  # [B, M, V]
    total = w.sum(2)
    protos = torch.bmm(w, f.transpose(1, 2)) / total.clamp_min(1e-12).unsqueeze(2)
    return protos, total > 0


def feature_difference_loss(
    features: torch.Tensor, own: torch.Tensor, other: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Mean positive cosine similarity between a model's own-organ and other-organ prototypes.

    With ``p_a`` the prototype (:func:`organ_prototypes`) of own organ ``a`` and ``q_o`` that of
    other organ ``o`` in the same image, both from the same model's features::

        loss = mean over pairs (b, a, o) with both regions non-empty of max(0, cos(p_a, q_o))

    0 (connected to ``features``) when there is no such pair.

    Args:
        features: ``[B, F, *S]`` the model's last decoder features.
        own: ``[B, A, *S]`` regions of the model's organs.
        other: ``[B, O, *S]`` regions of organs the model does not segment.
    """
    p, pv = organ_prototypes(features, own)
    q, qv = organ_prototypes(features, other)
    cos = F.cosine_similarity(p.unsqueeze(2), q.unsqueeze(1), dim=-1, eps=eps)  # [B, A, O]
    pairs = pv.unsqueeze(2) & qv.unsqueeze(1)
    if not bool(pairs.any()):
        return _zero(features)
    return torch.where(pairs, cos.clamp_min(0), 0.0).sum() / pairs.sum()


def mutual_consistency_loss(logits: Sequence[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Deep mutual learning between peers: each model's per-organ Bernoulli KL towards every peer.

    For models ``k != l`` with probabilities ``p_k = sigmoid(logit_k)`` and the peer detached::

        KL(q || p) = q log(q / p) + (1 - q) log((1 - q) / (1 - p)),  q = stopgrad(p_l), p = p_k
        loss = mean over ordered pairs (k, l), k != l, of mean_{b, c, v} KL(p_l || p_k)

    so every model learns from every other and none is pulled by its own gradient through a peer.
    0 for fewer than two models.

    Args:
        logits: ``K`` tensors ``[B, C, *S]`` of the same shape.
        eps: clamp of the peer's probability away from 0 and 1 inside the logarithms.
    """
    if len(logits) < 2:
        return _zero(logits[0]) if logits else torch.zeros(())
    shape = logits[0].shape
    if any(t.shape != shape for t in logits):
        raise ValueError(
            f"logits of every model must share one shape, got {[tuple(t.shape) for t in logits]}"
        )
    logits = [_upcast(t) for t in logits]
    total = logits[0].new_zeros(())
    pairs = 0
    for k, lk in enumerate(logits):
        for m, lm in enumerate(logits):
            if k == m:
                continue
            q = torch.sigmoid(lm.detach()).clamp(eps, 1 - eps)
            # BCE(p, q) - H(q) = KL(q || p), computed from logits for stability
            cross = F.binary_cross_entropy_with_logits(lk, q, reduction="none")
            entropy = -(q * q.log() + (1 - q) * (1 - q).log())
            total = total + (cross - entropy).mean()
            pairs += 1
    return total / pairs


def feature_similarity_loss(
    features: Sequence[torch.Tensor], masks: torch.Tensor, best: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Pull each organ's prototype towards that of the model currently most accurate on it.

    ``best[c]`` names the model with the highest validation Dice on organ ``c`` (``-1``: none yet).
    With ``p_k[b, c]`` model ``k``'s prototype of organ ``c`` in image ``b`` (:func:`organ_prototypes`
    over ``masks``)::

        loss = mean over (k, b, c) with k != best[c] >= 0 and region non-empty of
               1 - cos(p_k[b, c], stopgrad(p_best[c][b, c]))

    The best model gets no gradient from its own organ's term; 0 when no term applies.

    Args:
        features: ``K`` tensors ``[B, F, *S]``, the models' last decoder features.
        masks: ``[B, C, *S]`` organ regions (e.g. the one-hot target, ignored voxels excluded).
        best: ``[C]`` long.
    """
    if not features:
        raise ValueError("features must hold at least one model's features")
    best = torch.as_tensor(best, device=masks.device).long()
    if best.shape != (masks.shape[1],):
        raise ValueError(f"best must be [C] = [{masks.shape[1]}], got {tuple(best.shape)}")
    protos, valid = zip(*(organ_prototypes(f, masks) for f in features), strict=True)
    stacked = torch.stack(protos)  # [K, B, C, F]
    valid = valid[0]  # [B, C]: the regions are the same for every model
    k_ids = torch.arange(len(features), device=masks.device)
    has_best = best >= 0
    target = stacked.detach()[best.clamp_min(0), :, torch.arange(len(best), device=masks.device)]  # [C, B, F]
    target = target.permute(1, 0, 2)  # [B, C, F]
    cos = F.cosine_similarity(stacked, target.unsqueeze(0), dim=-1, eps=eps)  # [K, B, C]
    apply = (k_ids.view(-1, 1, 1) != best.view(1, 1, -1)) & has_best.view(1, 1, -1) & valid.unsqueeze(0)
    if not bool(apply.any()):
        return _zero(stacked)
    return torch.where(apply, 1 - cos, 0.0).sum() / apply.sum()


def merge_pseudo_labels(
    label: torch.Tensor,
    labelled: torch.Tensor,
    probs: torch.Tensor,
    predicted: torch.Tensor,
    high: float = 0.8,
    low: float = 0.2,
) -> torch.Tensor:
    """Full-organ targets of one training case: true labels, confident peer predictions, an ignore band.

    Per voxel ``v``, with ``U`` the organs the case's dataset does not label but some other model
    segments (``predicted & ~labelled``) and ``c* = argmax_{c in U} probs[c, v]``:

    - ``label[v] > 0`` (a true label): ``label[v]``, whatever the models say (true labels always win);
    - else ``probs[c*, v] >= high``: ``c* + 1`` (a confident prediction of an unlabelled organ);
    - else ``probs[c*, v] <= low`` (or ``U`` empty): 0, background;
    - else: :func:`ignore_index` (the band between the thresholds; no loss looks at it).

    Args:
        label: ``[*S]`` long, the case's true labels (0 background, ``k`` organ ``k - 1``).
        labelled: ``[C]`` bool, organs the case's dataset labels.
        probs: ``[C, *S]`` organ probabilities of the other models (each organ averaged over the
            models that segment it; any value where ``predicted`` is False).
        predicted: ``[C]`` bool, organs some other model segments.
        high: confidence at or above which a prediction becomes a pseudo label.
        low: probability at or below which every unlabelled organ counts as absent.

    Returns:
        ``[*S]`` long in ``[0, C + 1]``.
    """
    if not 0 <= low < high <= 1:
        raise ValueError(f"thresholds must satisfy 0 <= low < high <= 1, got low={low}, high={high}")
    c = probs.shape[0]
    if label.shape != probs.shape[1:]:
        raise ValueError(f"label {tuple(label.shape)} does not match probs {tuple(probs.shape)}")
    if labelled.shape != (c,) or predicted.shape != (c,):
        raise ValueError(f"labelled and predicted must be [C] = [{c}]")
    candidates = (predicted.bool() & ~labelled.bool()).to(probs.device)
    q = torch.where(
        candidates.view(c, *([1] * label.ndim)), probs.float(), torch.full_like(probs.float(), -1.0)
    )
    best, idx = q.max(0)
    pseudo = torch.where(
        best >= high,
        idx + 1,
        torch.where(best <= low, torch.zeros_like(idx), torch.full_like(idx, ignore_index(c))),
    )
    return torch.where(label > 0, label.long(), pseudo)


class IgnoreBCEDiceLoss(nn.Module):
    """BCE + soft Dice with per-voxel ignore and per-sample channel masks (stage B's supervised loss).

    Voxels whose target is :func:`ignore_index` add nothing (to BCE sums, Dice intersections and
    sums alike) and their logits get exactly zero gradient; channels a sample's ``channels`` mask
    leaves out likewise. Per sample ``b`` with channel set ``L_b`` and valid voxels ``V_b``::

        bce_b  = sum_{c in L_b, v in V_b} BCE(logit, t) / (|L_b| |V_b|)
        dice_b = mean_{c in L_b} 1 - (2 sum_{V_b} p t + smooth) / (sum_{V_b} p + sum_{V_b} t + smooth)

    and the loss is ``bce_weight * mean_b bce_b + dice_weight * mean_b dice_b``.

    Args:
        bce_weight: weight of the BCE term.
        dice_weight: weight of the Dice term.
        smooth: additive Dice smoothing.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1e-5) -> None:
        super().__init__()
        if bce_weight < 0 or dice_weight < 0:
            raise ValueError(f"bce_weight={bce_weight} and dice_weight={dice_weight} must be >= 0")
        self.bce_weight, self.dice_weight, self.smooth = bce_weight, dice_weight, smooth

    def components(
        self, logits: torch.Tensor, target: torch.Tensor, channels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "bce", "dice"}`` for logits ``[B, C, *S]``, target ``[B, (1,) *S]`` in
        ``[0, C + 1]`` and ``channels [B, C]`` bool."""
        b, c = logits.shape[:2]
        if target.ndim == logits.ndim:
            target = target[:, 0]
        if tuple(target.shape) != (b, *logits.shape[2:]) or tuple(channels.shape) != (b, c):
            raise ValueError(
                f"target {tuple(target.shape)} / channels {tuple(channels.shape)} do not match logits "
                f"{tuple(logits.shape)}"
            )
        target = target.long()
        if bool(((target < 0) | (target > ignore_index(c))).any()):
            raise ValueError(f"target values must lie in [0, {ignore_index(c)}] ({ignore_index(c)} = ignore)")
        logits = _upcast(logits)
        valid = (target != ignore_index(c)).unsqueeze(1)  # [B, 1, *S]
        mask = _expand(channels.bool().to(logits.device), logits.ndim) & valid  # [B, C, *S]
        logits = torch.where(mask, logits, torch.zeros_like(logits))
        onehot = _one_hot_organs(torch.where(valid[:, 0], target, 0), c, logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        bce = torch.where(mask, bce, torch.zeros_like(bce))
        n_vox = valid.flatten(1).sum(1)
        n_ch = channels.bool().sum(1).to(n_vox.device)
        bce_term = (bce.flatten(1).sum(1) / (n_vox * n_ch).clamp_min(1)).mean()
        prob = torch.where(mask, torch.sigmoid(logits), torch.zeros_like(logits))
        onehot = torch.where(mask, onehot, torch.zeros_like(onehot))
        sample_channels = channels.bool().to(logits.device) & (n_vox > 0).view(b, 1)
        dice_term = _soft_dice_loss(prob, onehot, sample_channels, self.smooth, batch_dice=False)
        total = self.bce_weight * bce_term + self.dice_weight * dice_term
        return {"loss": total, "bce": bce_term, "dice": dice_term}

    def forward(self, logits: torch.Tensor, target: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        return self.components(logits, target, channels)["loss"]
