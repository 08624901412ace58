"""An ensemble of same-architecture segmenters that averages their organ probabilities.

Deep mutual learning (:mod:`mosmos.finetune.mutual`) ends with several full-organ models; with
``train.mutual.final: ensemble`` the run's model is this module, so ``mosmos evaluate`` and
``mosmos predict`` rebuild it from ``model.json`` like any other registered segmenter.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mosmos.models.encoders.base import ImageEncoder
from mosmos.models.registry import create_model, register_model
from mosmos.models.tag_head import TagAttentionHead

__all__ = ["EnsembleSegmenter"]


class EnsembleSegmenter(nn.Module):
    """``members`` copies of a registered segmenter; the output is the logit of the mean sigmoid.

    ``forward`` returns ``logit(mean_k sigmoid(logits_k))`` (probabilities clamped to ``[1e-6, 1 -
    1e-6]``), so a caller applying a sigmoid gets exactly the members' mean organ probabilities.
    Parameters are named ``members.<k>.*``, each member's as in its own ``model.safetensors``.

    Args:
        encoder: the first member's encoder; the others get deep copies (their weights are loaded
            afterwards).
        num_classes: output channels (organs) of every member.
        num_tasks: tasks of every member.
        attention_head: optional stage 1 tag head, copied likewise.
        member: registered segmenter name of the members (``unet``, ``mo_ctrans``, ``unetr``).
        members: number of members (>= 1).
        member_decoder: the members' other constructor kwargs.

    Example::

        encoder = create_image_encoder("rescnn3d", channels=(8, 16, 16, 24), strides=(2, 2, 2, 2))
        net = EnsembleSegmenter(encoder, num_classes=4, member="unet", members=3)
        net(torch.randn(1, 1, 32, 32, 16)).shape  # [1, 4, 32, 32, 16]
    """

    def __init__(
        self,
        encoder: ImageEncoder,
        num_classes: int,
        num_tasks: int = 1,
        attention_head: TagAttentionHead | None = None,
        member: str = "unet",
        members: int = 2,
        member_decoder: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if members < 1:
            raise ValueError(f"members={members} must be >= 1")
        if member == "ensemble":
            raise ValueError("an ensemble's members cannot be ensembles")
        kwargs = dict(member_decoder or {})
        kwargs.pop("num_classes", None)
        kwargs.pop("num_tasks", None)
        self.members = nn.ModuleList(
            create_model(
                "segmenter",
                member,
                encoder=encoder if i == 0 else copy.deepcopy(encoder),
                attention_head=attention_head
                if i == 0 or attention_head is None
                else copy.deepcopy(attention_head),
                num_classes=num_classes,
                num_tasks=num_tasks,
                **kwargs,
            )
            for i in range(members)
        )
        self.num_classes, self.num_tasks = int(num_classes), int(num_tasks)
        self.task_conditioned = any(getattr(m, "task_conditioned", False) for m in self.members)
        self._config = {"member": member, "members": int(members), "member_decoder": kwargs}

    def decoder_config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "num_tasks": self.num_tasks, **self._config}

    def forward(
        self, x: torch.Tensor, task: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        probs = torch.stack([torch.sigmoid(m(x, task=task, mask=mask).float()) for m in self.members])
        return torch.logit(probs.mean(0).clamp(1e-6, 1 - 1e-6))


@register_model("segmenter", "ensemble")
def ensemble(encoder: ImageEncoder, **kwargs: Any) -> EnsembleSegmenter:
    """An :class:`EnsembleSegmenter` around ``encoder`` (see there for the kwargs)."""
    return EnsembleSegmenter(encoder, **kwargs)
