"""The training data order: a function of (seed, epoch) only, so a resumed run sees the batches an
uninterrupted one would."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mosmos.errors import MosmosError


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), so resume is exact."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_train_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable | None,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
) -> DataLoader:
    """Full batches of ``dataset`` in :class:`EpochSampler` order (the loader's ``set_epoch`` reaches it
    once accelerate has prepared it); raises :class:`MosmosError` when not even one batch fits."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed),
        collate_fn=collate_fn,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,  # page-locked batches: host-to-GPU copies that overlap compute
        # two batches ahead per worker; workers are not kept between epochs, so each epoch's copy of
        # the dataset carries the epoch its items are seeded with
        prefetch_factor=2 if num_workers > 0 else None,
        # its own generator: creating an iterator draws a worker seed from it, and drawing from the
        # global RNG would make dropout after a resume differ from the uninterrupted run
        generator=torch.Generator().manual_seed(seed),
    )
    if len(loader) == 0:
        raise MosmosError(
            f"the training set has {len(dataset)} cases, fewer than one batch "
            f"(train.batch_size={batch_size}); lower the batch size or add data"
        )
    return loader
