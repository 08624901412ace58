"""Stage 2 objectives: multi-organ segmentation from partially labelled datasets.

Each training sample comes from a dataset that annotates only some of the ``C`` organs. The
network predicts one logit per organ, ``logits`` ``[B, C, *S]`` (2D or 3D), and two ways of
training it without treating unannotated organs as background are offered:

* :class:`MaskedBCEDiceLoss`: one independent sigmoid per organ; the loss is computed on the
  organs the sample's dataset labels and unlabelled (sample, organ) pairs are ignored entirely
  (CLIP-Driven Universal Model, Liu et al., ICCV 2023), averaged over the labelled organs.
* :class:`MultiTalentLoss`: the same masking, but BCE and (batch) Dice *summed* over the valid
  channels, as MultiTalent does (Ulrich et al., MICCAI 2023), so an organ's gradient does not
  depend on how many organs its dataset labels.
* :class:`MarginalLoss`: a softmax over ``C + 1`` classes with a constant-zero background logit;
  for each sample the probabilities of its unlabelled organs are merged into background (Shi et
  al., "Marginal loss and exclusion loss for partially supervised multi-organ segmentation",
  Medical Image Analysis 2021).

Targets are integer label maps ``[B, 1, *S]`` or ``[B, *S]``: 0 is background and ``k`` is organ
``k - 1`` (channel ``k - 1`` of ``logits``). ``labelled`` ``[B, C]`` (bool, or float with 1 for
labelled) says which organs each sample's dataset annotates.

The losses are computed in at least float32 (half-precision logits are upcast). The masked and
marginal losses return, per batch, the mean over the ``B`` samples of per-sample losses; a sample without any labelled organ adds 0 to that mean (with
exactly zero gradient) rather than being dropped from the denominator, so a sample's gradient does
not depend on what else is in the batch.

:class:`DeepSupervisionLoss` applies any of them at every resolution of a deeply supervised decoder.

:func:`decode_prediction` and :func:`organ_probabilities` turn logits into a label map or organ
probabilities under the matching convention.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DeepSupervisionLoss",
    "MarginalLoss",
    "MaskedBCEDiceLoss",
    "MultiTalentLoss",
    "decode_prediction",
    "deep_supervision_weights",
    "organ_probabilities",
]

#: every strategy but "marginal" trains one independent sigmoid per organ
Strategy = Literal["masked", "marginal", "multitalent", "mutual"]
SIGMOID_STRATEGIES = ("masked", "multitalent", "mutual")


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


class MaskedBCEDiceLoss(nn.Module):
    """BCE + soft Dice on the labelled organs only (one sigmoid channel per organ).

    For sample ``b`` with labelled organ set ``L_b``::

        bce_b  = sum_{c in L_b, v} BCE(logit[b, c, v], t[b, c, v]) / (|L_b| * V)
        dice_b = mean_{c in L_b} 1 - (2 sum_v p t + smooth) / (sum_v p + sum_v t + smooth)

    with ``p = sigmoid(logit)`` and ``t`` the one-hot target of organ ``c``. The loss is
    ``bce_weight * mean_b bce_b + dice_weight * mean_b dice_b``; a sample with ``L_b`` empty adds 0.
    With ``batch_dice`` the Dice sums of each channel are pooled over the samples that label it
    (nnU-Net's "batch Dice") and the Dice term is the mean over channels labelled in the batch.

    Unlabelled (sample, channel) entries are masked out of the logits before anything is computed
    (``torch.where``), so they contribute nothing and receive exactly zero gradient, even if they
    hold inf or NaN. When nothing in the batch is labelled the loss is a zero still connected to
    ``logits``.

    Args:
        bce_weight: weight of the BCE term.
        dice_weight: weight of the Dice term.
        smooth: additive smoothing of the Dice numerator and denominator.
        batch_dice: pool the Dice sums over the batch per channel.

    Example::

        loss_fn = MaskedBCEDiceLoss()
        loss = loss_fn(logits, label_map, labelled)  # scalar
        terms = loss_fn.components(logits, label_map, labelled)  # {"loss", "bce", "dice"}
    """

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1e-5,
        batch_dice: bool = False,
    ) -> None:
        super().__init__()
        if bce_weight < 0 or dice_weight < 0:
            raise ValueError(f"bce_weight={bce_weight} and dice_weight={dice_weight} must be >= 0")
        if smooth < 0:
            raise ValueError(f"smooth={smooth} must be >= 0")
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth
        self.batch_dice = batch_dice

    def components(
        self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The weighted total and its unweighted terms.

        Args:
            logits: ``[B, C, *S]`` organ logits.
            target: ``[B, 1, *S]`` or ``[B, *S]`` integer label map (0 background, k organ k-1).
            labelled: ``[B, C]`` bool (or 0/1 float): which organs each sample's dataset labels.

        Returns:
            ``{"loss": bce_weight * bce + dice_weight * dice, "bce": bce, "dice": dice}``, scalars.
        """
        target, labelled = _check_inputs(logits, target, labelled)
        logits = _upcast(logits)
        mask = _expand(labelled, logits.ndim)
        # Mask first: where() passes exactly zero gradient to the entries it does not select.
        logits = torch.where(mask, logits, torch.zeros_like(logits))
        onehot = _one_hot_organs(target, logits.shape[1], logits.dtype)

        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        bce = torch.where(mask, bce, torch.zeros_like(bce))
        voxels = logits[0, 0].numel()
        per_sample_bce = bce.flatten(1).sum(1) / (labelled.sum(1).clamp_min(1) * voxels)
        bce_term = per_sample_bce.mean()

        prob = torch.where(mask, torch.sigmoid(logits), torch.zeros_like(logits))
        dice_term = _soft_dice_loss(prob, onehot, labelled, self.smooth, self.batch_dice)
        total = self.bce_weight * bce_term + self.dice_weight * dice_term
        return {"loss": total, "bce": bce_term, "dice": dice_term}

    def forward(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Scalar loss ``bce_weight * bce + dice_weight * dice`` (see :meth:`components`)."""
        return self.components(logits, target, labelled)["loss"]


class MarginalLoss(nn.Module):
    """Marginal cross-entropy + Dice over a softmax with an implicit background (Shi et al. 2021).

    Convention: the ``C`` organ logits and a constant-zero background logit form a softmax over
    ``C + 1`` classes, ``q = softmax([0, logit_1, ..., logit_C])``. For sample ``b`` the organs its
    dataset does not label are merged into background: ``q_bg' = q_0 + sum_{c not in L_b} q_c``,
    the labelled organs keep ``q_c``. The target's unlabelled organs are background too (any such
    voxel in ``target`` is relabelled 0). Then::

        ce_b   = mean_v -log q'[target_v]
        dice_b = mean_{c in L_b} 1 - (2 sum_v q_c t_c + smooth) / (sum_v q_c + sum_v t_c + smooth)

    and the loss is ``mean_b ce_b + dice_weight * mean_b dice_b`` (Dice over the labelled organs,
    not over the merged background). Unlike :class:`MaskedBCEDiceLoss`, unlabelled organ logits DO
    get gradient here: they share the softmax and their mass counts as background, which is the
    point of the marginal loss (the loss depends on them only through ``q_bg'``). A sample with no
    labelled organ has a single merged class (``ce = 0``); it adds 0 with exactly zero gradient.

    Args:
        dice_weight: weight of the Dice term (the cross-entropy has weight 1).
        smooth: additive smoothing of the Dice numerator and denominator.
        batch_dice: pool the Dice sums over the batch per channel (see :class:`MaskedBCEDiceLoss`).

    Example::

        loss_fn = MarginalLoss()
        terms = loss_fn.components(logits, label_map, labelled)  # {"loss", "ce", "dice"}
        pred = decode_prediction(logits, "marginal")
    """

    def __init__(
        self, dice_weight: float = 1.0, smooth: float = 1e-5, batch_dice: bool = False, ce_weight: float = 1.0
    ) -> None:
        super().__init__()
        if dice_weight < 0 or ce_weight < 0:
            raise ValueError(f"dice_weight={dice_weight} and ce_weight={ce_weight} must be >= 0")
        self.ce_weight = ce_weight
        if smooth < 0:
            raise ValueError(f"smooth={smooth} must be >= 0")
        self.dice_weight = dice_weight
        self.smooth = smooth
        self.batch_dice = batch_dice

    def components(
        self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The weighted total and its unweighted terms.

        Args:
            logits: ``[B, C, *S]`` organ logits (background logit implicitly 0).
            target: ``[B, 1, *S]`` or ``[B, *S]`` integer label map (0 background, k organ k-1).
            labelled: ``[B, C]`` bool (or 0/1 float): which organs each sample's dataset labels.

        Returns:
            ``{"loss": ce_weight * ce + dice_weight * dice, "ce": ce, "dice": dice}``, scalars.
        """
        target, labelled = _check_inputs(logits, target, labelled)
        logits = _upcast(logits)
        b, c = logits.shape[:2]
        has_label = labelled.any(1)
        sample_mask = _expand(has_label.view(b, 1), logits.ndim)
        logits = torch.where(sample_mask, logits, torch.zeros_like(logits))

        # Unlabelled organs are background in the target (relabel any stray voxel to 0).
        keep = torch.cat([torch.ones_like(labelled[:, :1]), labelled], dim=1)  # [B, C + 1]
        target = torch.where(torch.gather(keep, 1, target.flatten(1)).view_as(target), target, 0)

        # Hand-written: MONAI has no cross-entropy over per-sample merged classes.
        full = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
        log_q = torch.log_softmax(full, dim=1)  # [B, C + 1, *S]
        # Merged background: logsumexp over background and the unlabelled organs.
        merged = torch.cat([torch.ones_like(labelled[:, :1]), ~labelled], dim=1)
        merged = _expand(merged, log_q.ndim)
        log_bg = torch.logsumexp(torch.where(merged, log_q, torch.full_like(log_q, float("-inf"))), dim=1)
        log_organ = torch.gather(log_q, 1, target.unsqueeze(1)).squeeze(1)
        nll = -torch.where(target == 0, log_bg, log_organ)
        nll = torch.where(has_label.view(b, *([1] * (nll.ndim - 1))), nll, torch.zeros_like(nll))
        ce_term = nll.flatten(1).mean(1).mean()

        prob = log_q[:, 1:].exp()
        onehot = _one_hot_organs(target, c, logits.dtype)
        dice_term = _soft_dice_loss(prob, onehot, labelled, self.smooth, self.batch_dice)
        total = self.ce_weight * ce_term + self.dice_weight * dice_term
        return {"loss": total, "ce": ce_term, "dice": dice_term}

    def forward(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Scalar loss ``ce_weight * ce + dice_weight * dice`` (see :meth:`components`)."""
        return self.components(logits, target, labelled)["loss"]


class MultiTalentLoss(nn.Module):
    """MultiTalent's loss (Ulrich et al., "MultiTalent", MICCAI 2023, arXiv:2303.14444): BCE + Dice on
    the valid (labelled) channels only, *summed* over channels.

    Summed rather than averaged: a (sample, channel) entry's gradient does not depend on how many
    other channels are valid, so an organ weighs the same whether its dataset labels two organs or
    twelve (:class:`MaskedBCEDiceLoss` divides by ``|L_b|``). With ``B`` samples of ``V`` voxels::

        bce  = (1 / B) sum_b sum_{c in L_b} mean_v BCE(logit[b, c, v], t[b, c, v])
        dice = sum_{c valid in the batch} 1 - (2 sum_{b: c in L_b, v} p t + smooth)
                                              / (sum_{b: c in L_b, v} p + sum t + smooth)   (batch Dice)
        dice = (1 / B) sum_b sum_{c in L_b} 1 - (2 sum_v p t + smooth) / (sum_v p + sum_v t + smooth)
                                                                              (batch_dice=False)

    and the loss is ``bce_weight * bce + dice_weight * dice``. Invalid entries are masked before
    anything is computed and get exactly zero gradient. MultiTalent's batch Dice pools every voxel of
    the batch per channel (nnU-Net's), here over the samples whose dataset labels the channel.

    Args:
        bce_weight: weight of the BCE term.
        dice_weight: weight of the Dice term.
        smooth: additive Dice smoothing.
        batch_dice: pool each channel's Dice sums over the batch (MultiTalent's default).

    Example::

        loss_fn = MultiTalentLoss()
        terms = loss_fn.components(logits, label_map, labelled)  # {"loss", "bce", "dice"}
    """

    def __init__(
        self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1e-5, batch_dice: bool = True
    ) -> None:
        super().__init__()
        if bce_weight < 0 or dice_weight < 0:
            raise ValueError(f"bce_weight={bce_weight} and dice_weight={dice_weight} must be >= 0")
        if smooth < 0:
            raise ValueError(f"smooth={smooth} must be >= 0")
        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        self.smooth, self.batch_dice = smooth, batch_dice

    def components(
        self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "bce", "dice"}`` (see the class docstring); arguments as
        :meth:`MaskedBCEDiceLoss.components`."""
        target, labelled = _check_inputs(logits, target, labelled)
        logits = _upcast(logits)
        b = logits.shape[0]
        mask = _expand(labelled, logits.ndim)
        logits = torch.where(mask, logits, torch.zeros_like(logits))
        onehot = _one_hot_organs(target, logits.shape[1], logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        bce = torch.where(mask, bce, torch.zeros_like(bce))
        bce_term = bce.flatten(1).sum(1).sum() / (b * logits[0, 0].numel())
        prob = torch.where(mask, torch.sigmoid(logits), torch.zeros_like(logits))
        dims = tuple(range(2, prob.ndim))
        inter, psum, tsum = (prob * onehot).sum(dims), prob.sum(dims), onehot.sum(dims)
        zero = torch.zeros_like(inter)
        if self.batch_dice:
            inter, psum, tsum = (torch.where(labelled, x, zero).sum(0) for x in (inter, psum, tsum))
            loss_c = 1.0 - (2.0 * inter + self.smooth) / (psum + tsum + self.smooth)
            dice_term = torch.where(labelled.any(0), loss_c, torch.zeros_like(loss_c)).sum()
        else:
            loss_bc = 1.0 - (2.0 * inter + self.smooth) / (psum + tsum + self.smooth)
            dice_term = torch.where(labelled, loss_bc, zero).sum() / b
        total = self.bce_weight * bce_term + self.dice_weight * dice_term
        return {"loss": total, "bce": bce_term, "dice": dice_term}

    def forward(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        return self.components(logits, target, labelled)["loss"]


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's deep-supervision weights of ``n`` outputs (finest first): ``1 / 2**k``, normalised
    to sum 1. (nnU-Net also has an output at the coarsest decoder stage with weight 0; our decoders
    do not build it, see :class:`~mosmos.models.segmentation.unet.UNetSegmenter`.)"""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    raw = [0.5**k for k in range(n)]
    return [w / sum(raw) for w in raw]


class DeepSupervisionLoss(nn.Module):
    """A loss applied at every resolution of a deeply supervised decoder (nnU-Net's
    ``DeepSupervisionWrapper``, which MultiTalent trains with).

    ``components(outputs, target, labelled)`` takes the list of logits from
    ``net(..., intermediates=True)`` (finest first), brings the label map to each output's size by
    nearest-neighbour down-sampling (nnU-Net's ``nearest-exact``), applies ``loss`` to each, and
    returns the weighted sums (:func:`deep_supervision_weights`) of the base loss's named terms.
    A single tensor is passed to ``loss`` unchanged.

    Args:
        loss: a loss with ``components(logits, target, labelled) -> {"loss", ...}``.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def components(
        self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor, labelled: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if isinstance(outputs, torch.Tensor):
            return self.loss.components(outputs, target, labelled)
        weights = deep_supervision_weights(len(outputs))
        full = target if target.ndim == outputs[0].ndim else target.unsqueeze(1)
        total: dict[str, torch.Tensor] = {}
        for w, logits in zip(weights, outputs, strict=True):
            t = full
            if tuple(full.shape[2:]) != tuple(logits.shape[2:]):
                t = F.interpolate(full.float(), size=logits.shape[2:], mode="nearest-exact").to(full.dtype)
            for name, value in self.loss.components(logits, t, labelled).items():
                total[name] = total[name] + w * value if name in total else w * value
        return total

    def forward(
        self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor, labelled: torch.Tensor
    ) -> torch.Tensor:
        return self.components(outputs, target, labelled)["loss"]


def organ_probabilities(logits: torch.Tensor, strategy: Strategy) -> torch.Tensor:
    """Per-organ probabilities ``[B, C, *S]`` under the convention of the loss used to train.

    Args:
        logits: ``[B, C, *S]`` organ logits.
        strategy: ``"masked"`` (independent sigmoids, :class:`MaskedBCEDiceLoss`) or ``"marginal"``
            (softmax over a zero background logit and the organs, background dropped,
            :class:`MarginalLoss`).
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
