"""The optimizer and its learning-rate schedule: AdamW groups, per-prefix scales and freezes, and
linear warmup followed by cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def parameter_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr_scale: dict[str, float] | None = None,
    freeze_steps: dict[str, int] | None = None,
) -> list[dict]:
    """AdamW groups: no decay on biases, norms, temperatures and queries; optional per-prefix lr scale
    and per-prefix number of initial steps during which the group's learning rate is 0 (frozen).

    Args:
        model: the model whose trainable parameters are grouped.
        weight_decay: decay of the groups that take it.
        lr_scale: parameter-name prefix -> factor on the learning rate (the last matching prefix wins).
        freeze_steps: parameter-name prefix -> optimizer steps at learning rate 0.
    """
    groups: dict[tuple[bool, float, int], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or "logit_scale" in name
        scale, frozen = 1.0, 0
        for prefix, s in (lr_scale or {}).items():
            if name.startswith(prefix):
                scale = s
        for prefix, n in (freeze_steps or {}).items():
            if name.startswith(prefix):
                frozen = n
        groups.setdefault((no_decay, scale, frozen), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if nd else weight_decay, "lr_scale": scale, "freeze_steps": frozen}
        for (nd, scale, frozen), ps in groups.items()
    ]


def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    lr_scale: dict[str, float] | None = None,
    freeze_steps: dict[str, int] | None = None,
) -> torch.optim.AdamW:
    """AdamW at peak rate ``lr`` over :func:`parameter_groups` (same arguments)."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay, lr_scale, freeze_steps), lr=lr)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, rewarm: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``, per group: each
    group's rate is scaled by its ``lr_scale`` and is 0 for its first ``freeze_steps`` steps. With
    ``rewarm`` > 0 a frozen group, once its freeze ends, ramps up linearly again over ``rewarm`` steps
    to the rate the schedule has reached (the second warm-up of nnU-Net's fine-tuning from pretrained
    weights, after the new head trained alone) instead of joining at that rate at once."""

    # transformers' get_cosine_schedule_with_warmup does this too, but it ignores per-group scales.
    # A group frozen for its first N steps gets lr 0 there (AdamW with lr 0 leaves weights unchanged,
    # decoupled weight decay included), then warms up and decays with the others. Freezing through the
    # schedule rather than requires_grad keeps the optimizer and DDP set-up fixed and resume exact.
    def factor(step: int, frozen: int) -> float:
        if step < frozen:
            return 0.0
        ramp = (step - frozen + 1) / rewarm if frozen and rewarm and step < frozen + rewarm else 1.0
        if step < warmup:
            return ramp * (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return ramp * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def group_lambda(group: dict) -> Callable[[int], float]:
        scale, frozen = group.get("lr_scale", 1.0), group.get("freeze_steps", 0)
        return lambda s: scale * factor(s, frozen)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [group_lambda(g) for g in optimizer.param_groups])
