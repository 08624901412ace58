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

:class:`DeepSupervisionLoss` applies any of them at every resolution of a deeply supervised decoder
(:mod:`mosmos.models.deep_supervision`).

:func:`decode_prediction` and :func:`organ_probabilities` turn logits into a label map or organ
probabilities under the matching convention (:mod:`mosmos.models.seg_decode`).

Both are re-exported here; the shared blocks of the losses live in :mod:`mosmos.models.seg_loss_terms`.
"""

from __future__ import annotations

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
from mosmos.models.deep_supervision import DeepSupervisionLoss, deep_supervision_weights
from mosmos.models.seg_decode import decode_prediction, organ_probabilities
from mosmos.models.seg_loss_terms import _check_inputs, _expand, _one_hot_organs, _soft_dice_loss, _upcast


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
