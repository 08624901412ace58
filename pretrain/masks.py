"""``mosmos+masks``: a few labelled segmentation scans mixed into the report-supervised batches.

The labelled training cases of ``data.mask_datasets`` (nnU-Net / MSD folders or datalists, their
label names mapped to vocabulary organs as stage 2 maps them) go through the same preprocessing as
the report pairs. :class:`MaskMixer` gives them a fixed share of every training batch, ``round(
data.mask_ratio * batch_size)`` rows (at least one, and at least one report row left), in place of
that many report pairs: the batch size and the steps stay those of the run without masks, and an
epoch sees ``1 - mask_ratio`` of the report pairs. A masked scan has no report: the contrastive and
tag terms skip it, and :func:`mosmos.models.losses.attention_mask_loss` asks each organ its dataset
labels to put its attention inside its mask (:class:`mosmos.pretrain.objective.PretrainObjective`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mosmos.errors import ConfigError, DataError
from mosmos.transforms import PreprocessConfig

logger = logging.getLogger("mosmos")


class MaskedScans(Dataset):
    """Labelled segmentation scans as stage 1 items (see :class:`ImageReportDataset`'s), with
    ``labels`` holding ``k + 1`` on organ tag ``k`` (0 elsewhere, and on organs the dataset does not
    label), ``mask_organs`` ``[T]`` bool (the organs the scan's dataset labels), ``masked`` True,
    ``tags`` all unknown (-1), an empty ``report`` and ``index`` = ``index_offset`` + position (so
    that its augmentation draw differs from every report pair's).

    Args:
        volumes: the scans and their label maps, preprocessed (an ``ImageReportDataset`` built with
            ``label_paths``).
        luts: per scan, its dataset's label id -> ``k + 1`` table (``SegDataset.lookup_table``).
        labelled: ``[N, T]`` bool, the organs each scan's dataset labels.
        index_offset: added to the position for ``index``.
    """

    def __init__(
        self, volumes: Dataset, luts: Sequence[np.ndarray], labelled: np.ndarray, index_offset: int
    ) -> None:
        if len(luts) != len(volumes) or len(labelled) != len(volumes):
            raise ValueError(f"{len(luts)} tables and {len(labelled)} rows for {len(volumes)} scans")
        self.volumes = volumes
        self.luts = [torch.as_tensor(np.asarray(t, dtype=np.int64)) for t in luts]
        self.labelled = torch.as_tensor(np.asarray(labelled, dtype=bool))
        self.index_offset = index_offset

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, j: int) -> dict[str, Any]:
        item = dict(self.volumes[j])
        lut = self.luts[j]
        raw = item["labels"].long()
        if raw.min() < 0 or raw.max() >= len(lut):
            where = self.volumes.label_paths[j] if hasattr(self.volumes, "label_paths") else f"scan {j}"
            raise DataError(
                f"{where}: label values {raw.unique().tolist()} outside the declared 0..{len(lut) - 1}"
            )
        item["labels"] = lut[raw].to(torch.int16)
        item["mask_organs"] = self.labelled[j].clone()
        item["masked"] = True
        item["index"] = self.index_offset + int(j)
        return item


class MaskMixer:
    """Puts masked scans into a list of report items before collation (``ReportCollator(mix=...)``).

    The last ``count(len(items))`` items give way to masked scans, each drawn from ``(seed, epoch,
    index of the item it replaces)``: with the sampler's (seed, epoch) order, a resumed run sees the
    same batches. The report items get an all-zero ``labels`` map and no ``mask_organs``, so that the
    batch stacks (and augments) as one.

    Args:
        scans: the masked scans.
        ratio: share of each batch (``0 < ratio < 1``).
        seed: the run's seed.
        epoch_source: an object whose ``epoch`` attribute is the current epoch (the training dataset,
            whose epoch the engine sets, and which is copied into each loader worker).
    """

    def __init__(self, scans: MaskedScans, ratio: float, seed: int, epoch_source: Any) -> None:
        if not 0 < ratio < 1:
            raise ConfigError(f"data.mask_ratio={ratio} must be between 0 and 1 (exclusive)")
        if len(scans) == 0:
            raise ConfigError("data.mask_datasets hold no labelled training case")
        self.scans, self.ratio, self.seed, self.epoch_source = scans, ratio, seed, epoch_source
        self.num_tags = int(scans.labelled.shape[1])

    def count(self, batch_size: int) -> int:
        """Masked rows in a batch of ``batch_size``: ``round(ratio * batch_size)`` within [1, size - 1]."""
        if batch_size < 2:
            return 0
        return min(max(round(self.ratio * batch_size), 1), batch_size - 1)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        n_masked = self.count(len(items))
        epoch = int(getattr(self.epoch_source, "epoch", 0))
        kept = [dict(it) for it in items[: len(items) - n_masked]]
        for it in kept:
            it["labels"] = torch.zeros(it["image"].shape, dtype=torch.int16)
            it["mask_organs"] = torch.zeros(self.num_tags, dtype=torch.bool)
            it["masked"] = False
        drawn = [
            int(np.random.default_rng([self.seed, epoch, int(it["index"])]).integers(len(self.scans)))
            for it in items[len(items) - n_masked :]
        ]
        return kept + [self.scans[j] for j in drawn]


def build_masked_scans(
    cfg: Any,
    vocabulary: Any,
    preprocess: PreprocessConfig,
    cache_dir: Path,
    index_offset: int,
    volumes_class: type,
) -> MaskedScans:
    """The labelled training cases of ``cfg.data.mask_datasets``, mapped to ``vocabulary``'s organs.

    ``volumes_class`` is :class:`mosmos.pretrain.data.ImageReportDataset` (passed in: that module
    imports this one), which preprocesses and caches the scans and their label maps.

    Raises:
        ConfigError: a dataset that labels none of the vocabulary's organs, per-dataset options that
            name no mask dataset, or two mask datasets with one name.
    """
    from mosmos.check.datasets import dataset_case_files
    from mosmos.check.startup import start_up_checks
    from mosmos.segdata.dataset import read_seg_dataset, seg_dataset_name

    d = cfg.data
    organs = list(vocabulary.names)
    listing: list = []
    cases, luts, labelled, names = [], [], [], {}
    for path in d.mask_datasets:
        name = seg_dataset_name(path)
        ds = read_seg_dataset(
            path,
            vocabulary,
            label_map=d.mask_label_map.get(name),
            ignore=d.mask_ignore_labels.get(name),
            problems=listing,
        )
        if ds.name in names:
            raise ConfigError(f"data.mask_datasets: {path} and {names[ds.name]} are both named {ds.name!r}")
        names[ds.name] = str(path)
        covered = [o in ds.organs for o in organs]
        if not any(covered):
            raise ConfigError(
                f"data.mask_datasets: {path} labels {sorted(ds.labels.values())}, none of the stage 1 "
                f"organs {organs}"
            )
        chosen = [c for c in ds.train if c.label is not None][: d.mask_max_cases]
        cases += [(ds, c) for c in chosen]
        luts += [ds.lookup_table(organs)] * len(chosen)
        labelled += [covered] * len(chosen)
    unknown = sorted((set(d.mask_label_map) | set(d.mask_ignore_labels)) - set(names))
    if unknown:
        raise ConfigError(
            f"data.mask_label_map / data.mask_ignore_labels name dataset(s) {unknown} that are not in "
            f"data.mask_datasets; those are {sorted(names)}"
        )
    bad, _ = start_up_checks(
        [f for ds, c in cases for f in dataset_case_files(ds, [c])],
        listing,
        mode=d.check,
        on_bad_case=d.on_bad_case,
        what="data.mask_datasets",
        cache_path=cache_dir / "checks.json",
    )
    keep = [i for i, (_, c) in enumerate(cases) if (c.dataset, c.case_id) not in bad]
    volumes = volumes_class(
        [{"case_id": cases[i][1].case_id, "image": cases[i][1].image, "report": ""} for i in keep],
        np.full((len(keep), len(organs), 2), -1, dtype=np.int8),
        preprocess,
        cache_dir=cache_dir,
        label_paths=[cases[i][1].label for i in keep],
    )
    scans = MaskedScans(
        volumes, [luts[i] for i in keep], np.asarray([labelled[i] for i in keep]), index_offset
    )
    logger.info(
        "mosmos+masks: %d masked scan(s) from %s, organs %s",
        len(scans),
        ", ".join(names),
        [o for o, c in zip(organs, np.any([labelled[i] for i in keep], axis=0), strict=True) if c]
        if keep
        else [],
    )
    return scans
