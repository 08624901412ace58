"""Logits -> organ probabilities or a label map under a stage 2 loss's convention.

``"masked"``, ``"multitalent"`` and ``"mutual"`` train one independent sigmoid per organ
(:class:`~mosmos.models.seg_losses.MaskedBCEDiceLoss`,
:class:`~mosmos.models.seg_losses.MultiTalentLoss`); ``"marginal"`` a softmax over a constant-zero
background logit and the organs (:class:`~mosmos.models.seg_losses.MarginalLoss`).
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["decode_prediction", "organ_probabilities"]

#: every strategy but "marginal" trains one independent sigmoid per organ
Strategy = Literal["masked", "marginal", "multitalent", "mutual"]
SIGMOID_STRATEGIES = ("masked", "multitalent", "mutual")


def organ_probabilities(logits: torch.Tensor, strategy: Strategy) -> torch.Tensor:
    """Per-organ probabilities ``[B, C, *S]`` under the convention of the loss used to train.

    Args:
        logits: ``[B, C, *S]`` organ logits.
        strategy: ``"masked"`` (independent sigmoids,
            :class:`~mosmos.models.seg_losses.MaskedBCEDiceLoss`) or ``"marginal"`` (softmax over a
            zero background logit and the organs, background dropped,
            :class:`~mosmos.models.seg_losses.MarginalLoss`).
    """
    if strategy in SIGMOID_STRATEGIES:
        return torch.sigmoid(logits)
    if strategy == "marginal":
        full = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
        return torch.softmax(full, dim=1)[:, 1:]
    raise ValueError(f"strategy={strategy!r} must be one of {[*SIGMOID_STRATEGIES, 'marginal']}")


def decode_prediction(logits: torch.Tensor, strategy: Strategy, threshold: float = 0.5) -> torch.Tensor:
    """Label map ``[B, *S]`` (long; 0 background, k organ k-1) from organ logits ``[B, C, *S]``.

    ``"masked"``: the organ with the highest sigmoid probability if that probability exceeds
    ``threshold``, else background. ``"marginal"``: argmax over ``[0, logit_1, ..., logit_C]``
    (``threshold`` unused); ties go to the lower index, i.e. to background first.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be [B, C, *S], got {tuple(logits.shape)}")
    if strategy in SIGMOID_STRATEGIES:
        best, idx = torch.sigmoid(logits).max(dim=1)
        return torch.where(best > threshold, idx + 1, torch.zeros_like(idx))
    if strategy == "marginal":
        full = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
        return full.argmax(dim=1)
    raise ValueError(f"strategy={strategy!r} must be one of {[*SIGMOID_STRATEGIES, 'marginal']}")
