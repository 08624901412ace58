"""Validation of a segmentation dataset: its layout and labels (through the readers), then its volumes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mosmos.check.cases import CaseFiles, CheckCache, check_cases
from mosmos.check.report import CheckReport, strip_path
from mosmos.errors import ConfigError, DataError, MosmosError, Problem
from mosmos.segdata.dataset import SegDataset, map_dataset_labels, read_seg_dataset
from mosmos.segdata.layouts import SegCase
from mosmos.vocabulary import Vocabulary


def dataset_case_files(dataset: SegDataset, cases: Iterable[SegCase]) -> list[CaseFiles]:
    """What :func:`~mosmos.check.cases.check_cases` needs of ``dataset``'s ``cases``."""
    declared = tuple(sorted(dataset.labels))
    return [CaseFiles(c.case_id, c.image, c.label, dataset.name, declared) for c in cases]


def check_seg_dataset(
    path: str | Path,
    vocab: Vocabulary | None = None,
    label_map: dict[str, str] | None = None,
    ignore: list[str] | None = None,
    labels: dict[int, str] | None = None,
    *,
    deep: bool = True,
    workers: int = 1,
    cache: CheckCache | None = None,
    progress: bool = False,
) -> CheckReport:
    """Every problem of a segmentation dataset (nnU-Net v2, MSD or datalist) and its volumes.

    Args:
        path: the dataset folder or JSON file.
        vocab: the organ vocabulary its labels must map to; ``None`` skips the label mapping.
        label_map, ignore, labels: the dataset's ``data.label_map`` / ``data.ignore_labels`` /
            ``data.labels`` entries from a finetune config.
        deep: read the voxels too, not only the headers.
        workers: threads reading volumes.
        cache: per-file results of earlier checks.
        progress: show a progress bar.
    """
    report = CheckReport(str(path), "segmentation dataset")
    try:
        ds = read_seg_dataset(path, None, labels=labels, problems=report.problems)
    except MosmosError as e:
        report.problems.append(Problem(str(path), strip_path(str(e), path)))
        return report
    report.target = f"{ds.name} ({ds.root})"
    if vocab is not None:
        try:
            map_dataset_labels(ds, vocab, label_map, ignore)
        except ConfigError as e:
            report.problems.append(Problem(ds.root, strip_path(str(e), ds.root), None, ds.name))
    cases = ds.train + ds.test
    report.cases = len(cases)
    report.problems += check_cases(
        dataset_case_files(ds, cases), deep=deep, workers=workers, cache=cache, progress=progress
    )
    return report


def check_label_values(case: SegCase, dataset: SegDataset) -> None:
    """Load ``case``'s label map and check its voxels against the dataset's declared labels.

    The checks are ``mosmos check``'s; this raises the first problem with the label map itself.

    Raises:
        DataError: naming the file, when it cannot be read, is not 3D, does not match its image's
            shape, holds non-integer values, or holds ids the dataset does not declare.
    """
    if case.label is None:
        return
    for problem in check_cases(dataset_case_files(dataset, [case])):
        if problem.severity == "error" and problem.path == case.label:
            raise DataError(str(problem))
