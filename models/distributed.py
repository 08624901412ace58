"""Collectives for losses that need the global batch (plain ``torch.distributed``; no Accelerate)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["all_gather_with_grad", "gather_sizes", "is_distributed", "rank_and_world"]


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when not distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """The local batch size ``n`` of every process, in rank order (``[n]`` when not distributed)."""
    if not is_distributed():
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward all-reduces (sums) the incoming gradient and returns this rank's slice.

    Each process computes a loss from the gathered tensor, so every process's loss depends on every
    process's local tensor; summing the gradients over processes gives each local tensor the gradient
    of the *sum* of the per-process losses. DDP then averages parameter gradients over processes,
    which turns that sum into the gradient of the mean per-process loss: exactly the single-process
    gradient when each process's loss is its share of a global mean (as in ``ClipLoss``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        rank = dist.get_rank()
        ctx.sizes = list(sizes)
        ctx.rank = rank
        # all_gather needs equal shapes: pad every slice to the largest local batch, then trim.
        largest = max(ctx.sizes)
        padded = x.new_zeros((largest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        buffers = [torch.empty_like(padded) for _ in ctx.sizes]
        dist.all_gather(buffers, padded.contiguous())
        return torch.cat([buf[:n] for buf, n in zip(buffers, ctx.sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0, in rank order, with gradients flowing back.

    Gradient convention: the gradient reaching the local ``x`` is the sum, over processes, of the
    gradients with respect to this process's slice of the output (see ``_AllGatherWithGrad``).
    Local batches may differ in size. Identity when not distributed.

    Args:
        x: ``[n, ...]`` local tensor.
        sizes: every process's ``n`` in rank order, if already known (saves one collective).
    """
    if not is_distributed():
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    if len(sizes) != dist.get_world_size() or sizes[dist.get_rank()] != x.shape[0]:
        raise ValueError(f"sizes={list(sizes)} does not match world size and local batch {x.shape[0]}")
    return _AllGatherWithGrad.apply(x, sizes)
