"""Stage 2 training patches: the balanced, seeded patch stream cut from the cached training cases.

Sampling is a function of (seed, epoch, index) only, so the engine's exact resume holds:

- a case is drawn with a weight set by ``data.balance`` (``sqrt``: ∝ 1/√(size of its dataset), so a
  dataset's share grows as √size — MultiTalent's balance between large and small datasets);
- with probability ``data.foreground_fraction`` the patch is centred on a random voxel of a random
  organ the case's dataset labels (nnU-Net's foreground oversampling, which small organs need),
  otherwise anywhere in the volume;
- the augmentation (random affine, intensity) is seeded from the same generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mosmos.errors import ConfigError, DataError
from mosmos.finetune.config import FinetuneConfig
from mosmos.transforms import BODY_MASK_KEY, PreprocessConfig, build_augment, build_preprocess

if TYPE_CHECKING:
    from mosmos.finetune.data import SegData, TaskInfo

__all__ = ["PatchDataset", "build_train_dataset", "cached_train_cases", "case_weights"]


def case_weights(tasks: list[int], balance: str) -> np.ndarray:
    """Sampling probability of each training case given its task (dataset) and the balance rule."""
    tasks_arr = np.asarray(tasks)
    sizes = np.bincount(tasks_arr)[tasks_arr].astype(np.float64)
    if balance == "sqrt":
        w = 1.0 / np.sqrt(sizes)
    elif balance == "equal":
        w = 1.0 / sizes
    elif balance == "proportional":
        w = np.ones_like(sizes)
    else:
        raise ConfigError(f"data.balance={balance!r} must be one of ['sqrt', 'equal', 'proportional']")
    return w / w.sum()


def _crop_start(
    rng: np.random.Generator, shape: tuple[int, ...], patch: tuple[int, ...], centre: np.ndarray | None
) -> list[int]:
    starts = []
    for ax, (s, p) in enumerate(zip(shape, patch, strict=True)):
        hi = s - p
        if centre is None:
            starts.append(int(rng.integers(0, hi + 1)))
        else:
            starts.append(int(np.clip(centre[ax] - p // 2, 0, hi)))
    return starts


class PatchDataset(Dataset):
    """Training patches from cached, preprocessed cases; item ``i`` of epoch ``e`` is seeded by (seed, e, i).

    Items: ``image`` ``[1, *patch]`` float in [0, 1], ``body_mask`` ``[1, *patch]``, ``label``
    ``[1, *patch]`` int64 (0 background, k = output channel k-1; organs the case's dataset does not
    label are 0), ``labelled`` bool ``[C]`` (the valid channels) and ``task`` (int). Channels are
    the network's (:attr:`TaskInfo.target_lut`): organs, or with ``dataset_class`` (dataset, organ).
    """

    def __init__(
        self,
        cached: Dataset,
        task_of_case: list[int],
        tasks: list[TaskInfo],
        pre: PreprocessConfig,
        seed: int,
        samples_per_epoch: int,
        balance: str = "sqrt",
        foreground_fraction: float = 0.33,
        augment: bool = True,
        case_ids: list[str] | None = None,
        augment_options: dict | None = None,
    ) -> None:
        self.cached, self.task_of_case, self.tasks = cached, task_of_case, tasks
        self.patch = tuple(pre.size)
        self.seed, self.samples = seed, samples_per_epoch
        self.weights = case_weights(task_of_case, balance)
        self.foreground_fraction = foreground_fraction
        self.augment = build_augment(pre, ("image",), ("label",), augment_options) if augment else None
        self.case_ids = case_ids or [str(i) for i in range(len(task_of_case))]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        case = int(rng.choice(len(self.weights), p=self.weights))
        task = self.tasks[self.task_of_case[case]]
        try:
            item = self.cached[case]
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError chains
            raise DataError(
                f"case {self.case_ids[case]}: could not be loaded and preprocessed: {exc}"
            ) from None
        image = torch.as_tensor(item["image"]).float()
        body = torch.as_tensor(item[BODY_MASK_KEY])
        raw = torch.as_tensor(item["label"]).long()
        lut = torch.as_tensor(task.target_lut, dtype=torch.long)
        if int(raw.max()) >= len(lut) or int(raw.min()) < 0:
            raise DataError(
                f"case {self.case_ids[case]}: label id {int(raw.max())} is not declared in dataset {task.name}'s labels"
            )
        label = lut[raw]
        centre = None
        if rng.random() < self.foreground_fraction:
            # organs only: a pseudo-labelled map's ignore value (C + 1, train.strategy=mutual) is not one
            present = [int(k) for k in torch.unique(label) if 0 < k <= len(task.target_labelled)]
            if present:
                organ = present[int(rng.integers(len(present)))]
                voxels = torch.nonzero(label[0] == organ)
                centre = voxels[int(rng.integers(len(voxels)))].numpy()
        start = _crop_start(rng, tuple(image.shape[1:]), self.patch, centre)
        sl = (slice(None), *(slice(s, s + p) for s, p in zip(start, self.patch, strict=True)))
        out = {"image": image[sl], BODY_MASK_KEY: body[sl], "label": label[sl]}
        if self.augment is not None:
            self.augment.set_random_state(seed=int(rng.integers(2**31)))
            out = self.augment(out)
        return {
            "image": torch.as_tensor(out["image"]).float(),
            BODY_MASK_KEY: torch.as_tensor(out[BODY_MASK_KEY]).float(),
            "label": torch.as_tensor(out["label"]).long(),
            "labelled": torch.tensor(task.target_labelled, dtype=torch.bool),
            "task": torch.tensor(task.index, dtype=torch.long),
        }


def cached_train_cases(cfg: FinetuneConfig, data: SegData, output_dir: Path) -> Dataset:
    """The preprocessed training cases (image + label), cached on disk: what :func:`build_train_dataset`
    cuts patches from and what ``mosmos preprocess`` fills. Validation cases are not cached: they are
    predicted and scored in their own geometry (:class:`mosmos.finetune.inference.Predictor`)."""
    from mosmos.cache import cache_key, cached_dataset

    pre = data.preprocess
    if pre is None:
        raise ValueError("data.preprocess is unset; set it with load_preprocess(cfg) first")
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else output_dir.parent / ".cache" / "finetune"
    items = [{"image": c.image, "label": c.label} for c, _ in data.train]
    return cached_dataset(
        items,
        build_preprocess(pre, ("image",), ("label",)),
        cache_dir,
        cache_key(pre, ("image",), ("label",), prefix="finetune"),
    )


def build_train_dataset(cfg: FinetuneConfig, data: SegData, output_dir: Path) -> PatchDataset:
    """The cached, balanced patch stream over ``data.train``."""
    pre = data.preprocess
    assert pre is not None
    return PatchDataset(
        cached_train_cases(cfg, data, output_dir),
        [t for _, t in data.train],
        data.tasks,
        pre,
        seed=cfg.seed,
        samples_per_epoch=cfg.data.samples_per_epoch or len(data.train),
        balance=cfg.data.balance,
        foreground_fraction=cfg.data.foreground_fraction,
        augment=cfg.data.augment,
        augment_options=cfg.data.augment_options,
        case_ids=[c.case_id for c, _ in data.train],
    )
