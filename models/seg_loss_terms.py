"""Shared blocks of the stage 2 segmentation losses (:mod:`mosmos.models.seg_losses`).

Input checks (shapes, label-map range), the one-hot organ target, half-precision upcasting, the
``[B, C]`` -> ``[B, C, 1, ..., 1]`` mask expansion and the per-(sample, channel) masked soft Dice.
Conventions are those of :mod:`mosmos.models.seg_losses`.
"""

from __future__ import annotations

import torch


def _check_inputs(
    logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes; return the label map as ``[B, *S]`` long and ``labelled`` as ``[B, C]`` bool."""
    if logits.ndim < 3:
        raise ValueError(
            f"logits must be [B, C, *S] with at least one spatial dim, got {tuple(logits.shape)}"
        )
    b, c, *spatial = logits.shape
    if target.ndim == logits.ndim:
        if target.shape[1] != 1:
            raise ValueError(f"target must be [B, 1, *S] or [B, *S], got {tuple(target.shape)}")
        target = target[:, 0]
    if tuple(target.shape) != (b, *spatial):
        raise ValueError(
            f"target {tuple(target.shape)} does not match logits {tuple(logits.shape)} "
            "(expected [B, 1, *S] or [B, *S])"
        )
    if tuple(labelled.shape) != (b, c):
        raise ValueError(f"labelled must be [B, C] = {(b, c)}, got {tuple(labelled.shape)}")
    if target.is_floating_point():
        target = target.round()
    target = target.long()
    if bool(((target < 0) | (target > c)).any()):
        raise ValueError(f"target values must lie in [0, {c}] (0 = background, k = organ k-1)")
    labelled = labelled > 0.5 if labelled.is_floating_point() else labelled.bool()
    return target, labelled.to(logits.device)


def _one_hot_organs(target: torch.Tensor, num_organs: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, *S]`` label map -> ``[B, C, *S]`` one-hot of the organs (background dropped)."""
    organs = torch.arange(1, num_organs + 1, device=target.device)
    organs = organs.view(1, num_organs, *([1] * (target.ndim - 1)))
    return (target.unsqueeze(1) == organs).to(dtype)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (e.g. under autocast) -> float32; float32 and float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _expand(mask_bc: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[B, C]`` -> ``[B, C, 1, ..., 1]`` broadcastable against a ``ndim``-dim tensor."""
    return mask_bc.view(*mask_bc.shape, *([1] * (ndim - 2)))


def _soft_dice_loss(
    prob: torch.Tensor, onehot: torch.Tensor, mask_bc: torch.Tensor, smooth: float, batch_dice: bool
) -> torch.Tensor:
    """Soft Dice loss averaged over the labelled channels.

    Hand-written rather than ``monai.losses.DiceLoss``: MONAI's loss has no per-(sample, channel)
    mask, and masking its reduced output would leave the unlabelled sums in the graph (and, with
    ``batch=True``, pool unlabelled samples into a channel's sums).

    Returns:
        Scalar: the batch mean of per-sample losses (each the mean over that sample's labelled
        channels), or with ``batch_dice`` the mean over channels labelled anywhere in the batch of
        the Dice loss pooled over the samples that label that channel.
    """
    dims = tuple(range(2, prob.ndim))
    inter = (prob * onehot).sum(dims)
    psum = prob.sum(dims)
    tsum = onehot.sum(dims)
    zero = torch.zeros_like(inter)
    if batch_dice:
        inter, psum, tsum = (torch.where(mask_bc, x, zero).sum(0) for x in (inter, psum, tsum))
        channel = mask_bc.any(0)
        loss_c = 1.0 - (2.0 * inter + smooth) / (psum + tsum + smooth)
        loss_c = torch.where(channel, loss_c, torch.zeros_like(loss_c))
        return loss_c.sum() / channel.sum().clamp_min(1)
    loss_bc = 1.0 - (2.0 * inter + smooth) / (psum + tsum + smooth)
    loss_bc = torch.where(mask_bc, loss_bc, zero)
    per_sample = loss_bc.sum(1) / mask_bc.sum(1).clamp_min(1)
    return per_sample.mean()
