"""Image–report data for stage 1: split, dataset (cached preprocessing + augmentation), collator.

The organ tags come in as an array computed by the caller (``mosmos.pretrain.tags.tag_matrix`` over the
reports), so this module never parses text. Volumes go through the shared chain of
:mod:`mosmos.transforms`, the deterministic part cached on disk by :mod:`mosmos.cache`; optional
ground-truth organ label maps (for the pointing game) go through the same chain, nearest neighbour.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mosmos.batch_augment import BatchAugment
from mosmos.cache import cache_key, cached_dataset
from mosmos.errors import ConfigError, DataError, root_cause
from mosmos.transforms import BODY_MASK_KEY, PreprocessConfig, build_preprocess

logger = logging.getLogger("mosmos")

LABEL_KEY = "label"


def split_cases(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split of ``range(n)``, the same for the same seed on every machine.

    Returns sorted, disjoint index arrays covering ``range(n)``; with ``0 < val_fraction`` and ``n >= 2``
    each side gets at least one case.
    """
    if n < 0:
        raise ConfigError(f"split_cases: n must be >= 0, got {n}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation of ``range(n)`` that moves every index, the same for the same seed.

    Drawn uniformly among all derangements by rejection (numpy has no derangement sampler): a
    uniform permutation has no fixed point with probability about 1/e, so about 2.7 draws on average.

    Raises:
        ValueError: for ``n < 2`` (one item cannot be moved).
    """
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2 items, got n={n}")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def _plain(x: Any) -> torch.Tensor:
    """Drop MetaTensor meta: cached and freshly computed items then look the same to collation."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class ImageReportDataset(Dataset):
    """CT volumes with their reports and organ tags.

    Args:
        records: from :func:`mosmos.table.read_report_table` (``case_id``, ``image``, ``report``).
        tags: ``[N, n_organs, 2]`` int8 (1 positive, 0 negative, -1 unknown), row i for record i.
        preprocess: the shared preprocessing config (spacing, size, HU window, ...).
        cache_dir: root of the preprocessing cache (``None``: preprocess on every access).
        train: augment training batches (:meth:`augment_batch`, the random family of
            :func:`mosmos.transforms.build_augment` applied batch-wise by :class:`BatchAugment`).
        augment: overrides of the augmentation defaults.
        label_paths: optional ground-truth organ label maps, one per record, for the pointing game.

    Items are the cached, preprocessed volumes, never augmented: with ``train=True`` a collated batch
    is augmented as a whole by :meth:`augment_batch` (stage 1 calls it in the loader's collation on a
    CPU and inside the step on a GPU), each sample's draw seeded from (seed, epoch, index) (see
    :meth:`set_epoch`), so draws are reproducible for any batch, worker count or resume point.

    Items: ``image`` float32 ``[1, *size]`` in [0, 1], ``body_mask`` bool ``[1, *size]``, ``tags``
    int8 ``[n_organs, 2]``, ``report`` str, ``index`` int, ``case_id`` str, and with ``label_paths``
    ``labels`` int16 ``[1, *size]``.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tags: np.ndarray | torch.Tensor,
        preprocess: PreprocessConfig,
        cache_dir: str | Path | None = None,
        train: bool = False,
        augment: Mapping[str, float] | None = None,
        label_paths: Sequence[str | Path] | None = None,
        seed: int = 0,
    ) -> None:
        self.seed, self.epoch = seed, 0
        self.records = [dict(r) for r in records]
        missing = [k for k in ("case_id", "image", "report") if self.records and k not in self.records[0]]
        if missing:
            raise DataError(f"records lack key(s) {missing}; build them with mosmos.table.read_report_table")
        tags = torch.as_tensor(np.asarray(tags))
        if tags.ndim != 3 or tags.shape[0] != len(self.records) or tags.shape[2] != 2:
            raise DataError(
                f"tags must have shape [n_records={len(self.records)}, n_organs, 2], got {tuple(tags.shape)}"
            )
        self.tags = tags.to(torch.int8)
        self.label_paths = None
        if label_paths is not None:
            if len(label_paths) != len(self.records):
                raise DataError(f"label_paths has {len(label_paths)} entries for {len(self.records)} records")
            self.label_paths = [str(p) for p in label_paths]
            absent = [p for p in self.label_paths if not Path(p).is_file()]
            if absent:
                raise DataError(f"{len(absent)} label map(s) not found (first: {absent[:3]})")

        label_keys = (LABEL_KEY,) if self.label_paths else ()
        items = [
            {"image": r["image"], **({LABEL_KEY: self.label_paths[i]} if self.label_paths else {})}
            for i, r in enumerate(self.records)
        ]
        self.preprocess = preprocess
        self._volumes = cached_dataset(
            items,
            build_preprocess(preprocess, label_keys=label_keys),
            cache_dir,
            cache_key(preprocess, label_keys=label_keys),
        )
        self.batch_augment = BatchAugment(preprocess, augment) if train else None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation is seeded per (seed, epoch, case): the same draw on resume, in any worker."""
        self.epoch = epoch

    def sample_seed(self, index: int) -> int:
        """The augmentation seed of case ``index`` in the current epoch."""
        return (self.seed * 7_919 + self.epoch * 1_000_003 + int(index)) % 2**32

    def augment_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A collated training batch with each sample augmented by its (seed, epoch, index) draw, on
        the batch's device; the batch unchanged without ``train=True``."""
        if self.batch_augment is None:
            return batch
        keys = [k for k in ("body_mask", "labels") if k in batch]
        image, masks = self.batch_augment(
            batch["image"], [batch[k] for k in keys], [self.sample_seed(i) for i in batch["index"]]
        )
        return {**batch, "image": image, **dict(zip(keys, masks, strict=True))}

    @property
    def cached_volumes(self) -> Any:
        """The cached dataset of preprocessed volumes (what ``mosmos preprocess`` fills)."""
        return self._volumes

    def _volume(self, index: int) -> dict[str, Any]:
        try:
            item = self._volumes[index]
        except DataError:
            raise
        except Exception as e:  # MONAI wraps the real cause in RuntimeError("applying transform ...")
            cause = root_cause(e)
            if isinstance(cause, DataError):
                raise cause from None
            where = self.records[index]["image"]
            if self.label_paths:
                where += f" (labels {self.label_paths[index]})"
            raise DataError(f"{where}: cannot load and preprocess: {type(cause).__name__}: {cause}") from None
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        rec = self.records[index]
        vol = self._volume(index)
        out = {
            "image": _plain(vol["image"]).float(),
            "body_mask": _plain(vol[BODY_MASK_KEY]).bool(),
            "tags": self.tags[index],
            "report": rec["report"],
            "index": index,
            "case_id": str(rec["case_id"]),
        }
        if self.label_paths:
            out["labels"] = _plain(vol[LABEL_KEY]).to(torch.int16)
        return out


class ReportCollator:
    """Stacks tensors and tokenises the reports (padding to the longest, truncation to ``max_length``).

    Tokenising here, in the data loader, keeps it out of ``forward`` and off the training process;
    so does ``augment`` (e.g. :meth:`ImageReportDataset.augment_batch`), applied to the stacked batch
    when given: on a CPU, a loader worker then augments the next batch while the model computes.
    ``mix`` (e.g. :class:`mosmos.pretrain.masks.MaskMixer`) may first replace some items (by masked
    scans), before anything is stacked.
    Output: ``image``, ``body_mask``, ``tags`` (and ``labels``, and with ``mix`` ``mask_organs`` and
    ``masked``) stacked; ``input_ids`` and ``attention_mask`` ``[B, L]``; ``report``, ``case_id`` and
    ``index`` as lists.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 256,
        augment: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        mix: Callable[[Sequence[Mapping[str, Any]]], Sequence[Mapping[str, Any]]] | None = None,
    ) -> None:
        if max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.augment = augment
        self.mix = mix

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not batch:
            raise ValueError("ReportCollator got an empty batch")
        if self.mix is not None:
            batch = self.mix(batch)
        out: dict[str, Any] = {}
        for key in ("image", "body_mask", "tags", "labels", "mask_organs"):
            if key in batch[0]:
                out[key] = torch.stack([b[key] for b in batch])
        if "masked" in batch[0]:
            out["masked"] = torch.tensor([bool(b["masked"]) for b in batch])
        reports = [b["report"] for b in batch]
        tok = self.tokenizer(
            reports, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out["input_ids"] = tok["input_ids"]
        out["attention_mask"] = tok["attention_mask"]
        out["report"] = reports
        out["case_id"] = [b["case_id"] for b in batch]
        out["index"] = [int(b["index"]) for b in batch]
        return self.augment(out) if self.augment is not None else out


@dataclass
class PretrainData:
    """Everything stage 1 training reads, built from the config by :func:`build_datasets`."""

    train: ImageReportDataset
    val: ImageReportDataset
    train_reports: list[str]
    train_tags: np.ndarray
    organ_label_ids: list[int | None] | None
    skipped: list[Any] = field(default_factory=list)  # Problems of the cases left out (on_bad_case=skip)
    # per validation scan, its organs' ground-truth status and findings (synthetic findings.json), if any
    val_findings: list[dict] | None = None
    # mosmos+masks: what puts the masked scans of data.mask_datasets into training batches (else None)
    mask_mixer: Any = None

    @staticmethod
    def make_collator(
        tokenizer: Any,
        max_length: int,
        augment: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        mix: Callable[[Sequence[Mapping[str, Any]]], Sequence[Mapping[str, Any]]] | None = None,
    ) -> ReportCollator:
        return ReportCollator(tokenizer, max_length, augment, mix)


def _ground_truth(root: Path, records: list[dict], organs: list[str]) -> tuple[list[Path], list[int | None]]:
    """Label-map paths per record and the label id of each organ, from a synthetic ``ground_truth/``."""
    labels_json = root / "labels.json"
    if not labels_json.is_file():
        raise DataError(f"data.ground_truth={root}: {labels_json.name} not found")
    ids = json.loads(labels_json.read_text())
    paths = [root / "labels" / f"{r['case_id']}.nii.gz" for r in records]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"data.ground_truth={root}: {len(missing)} label maps missing (first: {missing[0]})")
    return paths, [ids.get(o) for o in organs]


def _findings(root: Path, records: list[dict]) -> list[dict] | None:
    """Each record's ``organs`` entry of ``findings.json`` (None without the file); bad content is a
    DataError naming the file."""
    path = root / "findings.json"
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text())
        out = [table[str(r["case_id"])]["organs"] for r in records]
    except json.JSONDecodeError as exc:
        raise DataError(f"data.ground_truth: {path} is not valid JSON ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise DataError(f"data.ground_truth: {path} has no organs entry for case {exc}") from None
    if not all(isinstance(o, dict) for o in out):
        raise DataError(f"data.ground_truth: {path}: each case's organs entry must be a mapping")
    return out


def build_datasets(cfg: Any, vocabulary: Any) -> PretrainData:
    """Read the report table, parse tags, split by seed and build the cached datasets of a
    :class:`mosmos.pretrain.config.PretrainConfig`. With ``data.shuffle_reports`` every scan is paired with
    another scan's report (and its tags): the shuffled-report control of the benchmark. With
    ``data.mask_datasets`` the labelled scans of those datasets come as ``mask_mixer``, for the
    training collator (``mosmos+masks``: :mod:`mosmos.pretrain.masks`)."""
    from mosmos.check.cases import CaseFiles
    from mosmos.check.startup import start_up_checks
    from mosmos.pretrain.tag_labels import apply_labels, label_organs, read_labels_table
    from mosmos.pretrain.tags import tag_matrix
    from mosmos.table import read_report_table

    d = cfg.data
    cache_dir = Path(d.cache_dir) if d.cache_dir else Path(cfg.output_dir).parent / ".cache"
    listing: list = []
    records = read_report_table(d.table, d.image_column, d.report_columns, d.image_root, problems=listing)
    bad, problems = start_up_checks(
        [CaseFiles(r["case_id"], r["image"], dataset=Path(d.table).name) for r in records],
        listing,
        mode=d.check,
        on_bad_case=d.on_bad_case,
        what=f"data.table={d.table}",
        cache_path=cache_dir / "checks.json",
    )
    records = [r for r in records if (Path(d.table).name, r["case_id"]) not in bad]
    skipped = [p for p in problems if p.severity == "error"]
    if skipped:
        logger.warning(
            "skipping %d case(s) of %s with problems (data.on_bad_case=skip); %d left; see RUN/skipped.csv",
            len({p.case for p in skipped}),
            d.table,
            len(records),
        )
    if len(records) < 2:
        raise DataError(f"data.table={d.table}: {len(records)} usable case(s) left; at least 2 are needed")
    label_cases = [str(r["case_id"]) for r in records]  # whose labels go with each report
    if d.shuffle_reports:
        # A derangement, not a plain shuffle: a permutation keeps about one scan with its own report,
        # which would leak true pairs into the control.
        perm = derangement(len(records), cfg.seed + 1)
        reports = [records[j]["report"] for j in perm]
        label_cases = [label_cases[j] for j in perm]
        for r, text in zip(records, reports, strict=True):
            r["report"] = text
    tags = tag_matrix([r["report"] for r in records], vocabulary)
    if d.labels_table:
        organs_of = label_organs(d.label_organs, vocabulary)
        table = read_labels_table(d.labels_table, d.image_column, organs_of)
        tags = apply_labels(
            tags, label_cases, table, organs_of, vocabulary, f"data.labels_table={d.labels_table}"
        )
    train_idx, val_idx = split_cases(len(records), d.val_fraction, cfg.seed)
    preprocess = PreprocessConfig(
        spacing=tuple(d.spacing),
        size=tuple(d.size),
        hu_window=tuple(d.hu_window),
        body_threshold_hu=d.body_threshold_hu,
    )
    label_paths, organ_ids, val_findings = (None, None, None)
    if d.ground_truth:
        label_paths, organ_ids = _ground_truth(Path(d.ground_truth), records, vocabulary.names)
        val_findings = _findings(Path(d.ground_truth), [records[i] for i in val_idx])

    def subset(idx: np.ndarray, train: bool, with_labels: bool) -> ImageReportDataset:
        return ImageReportDataset(
            [records[i] for i in idx],
            tags[idx],
            preprocess,
            cache_dir=cache_dir,
            train=train and d.augment,
            augment=d.augment_options,
            label_paths=[label_paths[i] for i in idx] if (with_labels and label_paths) else None,
            seed=cfg.seed,
        )

    train = subset(train_idx, train=True, with_labels=False)
    mixer = None
    if d.mask_datasets:
        from mosmos.pretrain.masks import MaskMixer, build_masked_scans

        scans = build_masked_scans(
            cfg, vocabulary, preprocess, cache_dir, index_offset=len(train), volumes_class=ImageReportDataset
        )
        mixer = MaskMixer(scans, d.mask_ratio, cfg.seed, epoch_source=train)
    return PretrainData(
        train=train,
        val=subset(val_idx, train=False, with_labels=True),
        train_reports=[records[i]["report"] for i in train_idx],
        train_tags=tags[train_idx],
        organ_label_ids=organ_ids,
        skipped=skipped,
        val_findings=val_findings,
        mask_mixer=mixer,
    )
