"""Stage 2 data: several partially labelled datasets as one stream of training patches.

Each dataset is one task: it labels its own organs, named its own way (mapped to the vocabulary by
:func:`mosmos.segdata.dataset.read_seg_dataset`). Cases are preprocessed once by the same MONAI chain as
stage 1 (``resize_mode="pad"``: the whole body is kept, padded to at least the patch size) and
cached; patches are cut at train time.

The patch stream cut from the cached training cases (balanced sampling, foreground oversampling,
augmentation) is in :mod:`mosmos.finetune.patches`; its names are re-exported here.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mosmos.errors import ConfigError, DataError
from mosmos.finetune.channels import channel_lut, dataset_class_channels, valid_channels
from mosmos.finetune.config import FinetuneConfig
from mosmos.finetune.patches import PatchDataset as PatchDataset
from mosmos.finetune.patches import build_train_dataset as build_train_dataset
from mosmos.finetune.patches import cached_train_cases as cached_train_cases
from mosmos.finetune.patches import case_weights as case_weights
from mosmos.segdata.dataset import SegDataset, read_seg_dataset, seg_dataset_name
from mosmos.segdata.layouts import SegCase
from mosmos.transforms import PreprocessConfig
from mosmos.vocabulary import Vocabulary

logger = logging.getLogger("mosmos")

DEFAULT_SPACING = (1.5, 1.5, 3.0)
DEFAULT_HU_WINDOW = (-200.0, 300.0)
DEFAULT_BODY_THRESHOLD = -500.0


@dataclass
class TaskInfo:
    """One task: a dataset, the organs it labels, and how its label ids map to output channels."""

    index: int
    name: str
    organs: list[str]  # canonical organs it labels, in output-channel order
    labelled: list[bool]  # per output channel
    lut: np.ndarray  # dataset label id -> 1 + output organ index (0: background / ignored)
    dataset: SegDataset
    # model.output_channels=dataset_class: label id -> 1 + network channel, and the valid channels
    # (this dataset's own); None: the organ layout, where channels are the organs (lut, labelled)
    channel_lut: np.ndarray | None = None
    channel_labelled: list[bool] | None = None

    @property
    def target_lut(self) -> np.ndarray:
        """Label id -> 1 + network output channel: what training targets use."""
        return self.lut if self.channel_lut is None else self.channel_lut

    @property
    def target_labelled(self) -> list[bool]:
        """Per network output channel: whether this dataset's cases have a target for it."""
        return self.labelled if self.channel_labelled is None else self.channel_labelled


@dataclass
class SegData:
    """The datasets of a run, split into training and validation cases."""

    organs: list[str]  # output organs: every organ some dataset labels, in vocabulary order
    tasks: list[TaskInfo]
    # the network's channels as (task index, organ) with model.output_channels=dataset_class (see
    # mosmos.finetune.channels); None: one channel per organ of ``organs``
    channels: list[tuple[int, str]] | None = None
    train: list[tuple[SegCase, int]] = field(default_factory=list)  # (case, task index)
    val: list[tuple[SegCase, int]] = field(default_factory=list)
    preprocess: PreprocessConfig | None = None
    skipped: list[Any] = field(default_factory=list)  # Problems of the cases left out (on_bad_case=skip)

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def resolve_preprocess(cfg: FinetuneConfig, encoder_json: dict | None) -> PreprocessConfig:
    """The preprocessing of a run: explicit ``data.*`` settings, else the stage 1 encoder's, else defaults."""
    pre = (encoder_json or {}).get("preprocess", {}) or {}
    spacing = cfg.data.spacing or pre.get("spacing") or DEFAULT_SPACING
    hu_window = cfg.data.hu_window or pre.get("hu_window") or DEFAULT_HU_WINDOW
    threshold = cfg.data.body_threshold_hu
    if threshold is None:
        threshold = pre.get("body_threshold_hu", DEFAULT_BODY_THRESHOLD)
    return PreprocessConfig(
        spacing=tuple(spacing),
        size=tuple(cfg.data.patch_size),
        hu_window=tuple(hu_window),
        body_threshold_hu=threshold,
        resize_mode="pad",
    )


def load_preprocess(cfg: FinetuneConfig) -> PreprocessConfig:
    """The run's preprocessing (:func:`resolve_preprocess`), reading the stage 1 export ``model.init``
    names, if any (with ``model.transfer=encoder_decoder``, the stage 2 run's ``model.json``)."""
    from mosmos.export import read_encoder_export

    encoder_json = None
    if cfg.model.init != "random" and cfg.model.transfer == "encoder_decoder":
        from mosmos.finetune.pretrained import read_network_source

        encoder_json = {"preprocess": read_network_source(cfg.model.init)[0].preprocess}
    elif cfg.model.init != "random":
        encoder_json = read_encoder_export(cfg.model.init)[0].to_dict()
    return resolve_preprocess(cfg, encoder_json)


def _split(
    cases: list[SegCase],
    val_fraction: float,
    fraction: float,
    seed: int,
    salt: int,
    max_cases: int | None = None,
):
    """Seeded (train, val) split of one dataset's cases, then a seeded subset of the training part
    (``fraction`` of it, at most ``max_cases``): the validation cases do not depend on the subset, and
    a smaller subset is a prefix of a larger one's order (nested)."""
    if len(cases) < 2:
        raise DataError(
            f"dataset {cases[0].dataset if cases else '?'} has {len(cases)} labelled training case(s); "
            "at least 2 are needed (one to train, one to validate)"
        )
    rng = np.random.default_rng([seed, salt])
    order = rng.permutation(len(cases))
    n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    val = [cases[i] for i in sorted(order[:n_val])]
    train_idx = order[n_val:]
    # the subset is drawn from its own stream: a lower fraction keeps a subset of a higher one's cases
    keep_order = np.random.default_rng([seed, salt, 1]).permutation(len(train_idx))
    n_keep = max(1, math.ceil(fraction * len(train_idx)))
    if max_cases is not None:
        n_keep = min(n_keep, max_cases)
    train = [cases[train_idx[i]] for i in sorted(keep_order[:n_keep])]
    return sorted(train, key=lambda c: c.case_id), val


def build_seg_data(cfg: FinetuneConfig, vocab: Vocabulary) -> SegData:
    """Read every configured dataset, map its labels, split and subset it."""
    from mosmos.check.datasets import dataset_case_files
    from mosmos.check.startup import start_up_checks

    datasets: list[SegDataset] = []
    names_seen: dict[str, str] = {}
    listing: list = []  # per-case problems met while listing (missing files, duplicate ids ...)
    for path in cfg.data.datasets:
        # the per-dataset options are keyed by the dataset's name (nnU-Net folder name, MSD name, ...)
        name = seg_dataset_name(path)
        ds = read_seg_dataset(
            path,
            vocab,
            label_map=cfg.data.label_map.get(name),
            ignore=cfg.data.ignore_labels.get(name),
            labels=cfg.data.labels.get(name),
            problems=listing,
        )
        if ds.name in names_seen:
            raise ConfigError(
                f"data.datasets: {path} and {names_seen[ds.name]} are both named {ds.name!r}; "
                "each dataset is a task and needs its own name"
            )
        names_seen[ds.name] = str(path)
        datasets.append(ds)
    unknown = sorted(
        (set(cfg.data.label_map) | set(cfg.data.ignore_labels) | set(cfg.data.labels)) - set(names_seen)
    )
    if unknown:
        raise ConfigError(
            f"data.label_map / data.ignore_labels / data.labels name dataset(s) {unknown} that are not "
            f"in data.datasets; the datasets are {sorted(names_seen)}"
        )
    subset = cfg.data.subset_datasets
    paths = [str(p) for p in cfg.data.datasets]
    unmatched = [d for d in subset or [] if d not in names_seen and d not in paths]
    if unmatched:
        raise ConfigError(
            f"data.subset_datasets names {unmatched}, which are not in data.datasets; the datasets are "
            f"{sorted(names_seen)} (or their data.datasets entries {paths})"
        )
    labelled_organs = {o for ds in datasets for o in ds.organs}
    organs = [o for o in vocab.names if o in labelled_organs]
    if not organs:
        raise ConfigError("no dataset in data.datasets labels any vocabulary organ")
    data = SegData(organs=organs, tasks=[])
    if cfg.model.output_channels == "dataset_class":
        data.channels = dataset_class_channels([ds.organs for ds in datasets], organs)
    for ti, ds in enumerate(datasets):
        labelled = [o in ds.organs for o in organs]
        task = TaskInfo(ti, ds.name, list(ds.organs), labelled, ds.lookup_table(organs), ds)
        if data.channels is not None:
            task.channel_lut = channel_lut(task.lut, ti, data.channels, organs)
            task.channel_labelled = valid_channels(ti, data.channels)
        data.tasks.append(task)
        cases = [c for c in ds.train if c.label is not None]
        subsetted = subset is None or ds.name in subset or paths[ti] in subset
        # salted by the dataset's name, not its position: a dataset splits the same way alone or in
        # any combination with others (so single-dataset and joint runs validate on the same cases)
        train, val = _split(
            cases,
            cfg.data.val_fraction,
            cfg.data.fraction if subsetted else 1.0,
            cfg.seed,
            zlib.crc32(ds.name.encode()),
            cfg.data.max_train_cases if subsetted else None,
        )
        data.train += [(c, ti) for c in train]
        data.val += [(c, ti) for c in val]
    # the checks run on the cases this run uses, after the split, so a bad case never moves a good one
    # to the other side of the split
    cache_dir = (
        Path(cfg.data.cache_dir)
        if cfg.data.cache_dir
        else Path(cfg.output_dir).parent / ".cache" / "finetune"
    )
    used = [f for c, ti in data.train + data.val for f in dataset_case_files(data.tasks[ti].dataset, [c])]
    bad, problems = start_up_checks(
        used,
        listing,
        mode=cfg.data.check,
        on_bad_case=cfg.data.on_bad_case,
        what="data.datasets",
        cache_path=cache_dir / "checks.json",
    )
    if bad:
        data.train = [(c, t) for c, t in data.train if (c.dataset, c.case_id) not in bad]
        data.val = [(c, t) for c, t in data.val if (c.dataset, c.case_id) not in bad]
        data.skipped = [p for p in problems if p.severity == "error"]
        logger.warning(
            "skipping %d case(s) with problems (data.on_bad_case=skip); see RUN/skipped.csv", len(bad)
        )
        for task in data.tasks:
            n_train = sum(t == task.index for _, t in data.train)
            n_val = sum(t == task.index for _, t in data.val)
            if not n_train or not n_val:
                raise DataError(
                    f"dataset {task.name}: {n_train} training and {n_val} validation case(s) left after "
                    "skipping bad cases; at least one of each is needed"
                )
    return data


def load_label(path: str, lut: np.ndarray, dataset: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """A label map in its own voxel grid, mapped to output channels (0 background), and its spacing."""
    import nibabel as nib

    try:
        img = nib.load(path)
        raw = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for unreadable files
        raise DataError(f"{path}: not a readable NIfTI label map: {e}") from None
    if raw.ndim != 3:
        raise DataError(f"{path}: expected a 3D label map, got shape {raw.shape}")
    ids = np.rint(raw).astype(np.int64)
    if not np.array_equal(ids, raw) or ids.min() < 0 or ids.max() >= len(lut):
        bad = sorted(set(np.unique(raw).tolist()) - set(range(len(lut))))[:5]
        raise DataError(f"{path}: label values {bad} are not label ids declared by dataset {dataset}")
    return lut[ids], tuple(float(z) for z in img.header.get_zooms()[:3])


def organ_tasks(data: SegData) -> dict[str, int]:
    """For each output organ, the task used when none is named: the one with most training cases labelling it."""
    counts = np.bincount([t for _, t in data.train], minlength=len(data.tasks))
    out = {}
    for organ in data.organs:
        candidates = [t.index for t in data.tasks if organ in t.organs]
        out[organ] = max(candidates, key=lambda i: (counts[i], -i))
    return out
