"""Deep supervision: a stage 2 loss applied at every resolution of a deeply supervised decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DeepSupervisionLoss", "deep_supervision_weights"]


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
