"""Input checks: every problem of a report table or a segmentation dataset, found before training.

``mosmos check PATH`` runs them and prints each problem with the file at fault; training runs the
same checks on the cases it uses and, with ``data.on_bad_case: skip``, leaves the bad ones out and
lists them in ``RUN/skipped.csv``.

What is checked, per volume (NIfTI read with nibabel, other formats with MONAI's ``LoadImage``):

- the file exists and its header reads; with ``deep`` (the default) the voxels read too, which
  catches truncated or corrupt gzip streams;
- it is 3D (a trailing axis of length 1 is accepted; a 4D series is not);
- voxel sizes are finite, positive and at most :data:`MAX_SPACING_MM`, and the affine is invertible;
- images: no NaN/inf voxels; a constant image and one whose values look normalised rather than in
  Hounsfield units are warnings;
- label maps: integer values, no negative ids, only ids the dataset declares; an empty label map is
  a warning;
- an image and its label map agree in shape and affine.

Per table: readable, UTF-8 (bad lines are named), the named columns exist, each row has an image
and a non-empty report, case ids are unique, identical reports on several rows (a warning: fine
for reconstructions of one scan), and every image exists and passes the volume checks. Per
dataset: the layout reads, images and label maps pair up, listed files exist, case ids are unique,
and every label maps to a vocabulary organ.

MONAI's ``DataStats``/``check_*`` utilities report on one loaded tensor and raise on the first
problem; a checker that names every file at fault, before any preprocessing, is written here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mosmos.errors import ConfigError, DataError, MosmosError, Problem
from mosmos.io import atomic_write_text, write_json

logger = logging.getLogger("mosmos")

MAX_SPACING_MM = 10.0
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
_NIFTI = (".nii", ".nii.gz")
_AFFINE_RTOL, _AFFINE_ATOL = 1e-3, 1e-2  # mm: a label map may differ from its image by rounding only


@dataclass
class VolumeInfo:
    """What the pair checks need from a volume that read."""

    shape: tuple[int, ...]
    affine: list[list[float]]
    spacing: tuple[float, ...]


# ------------------------------------------------------------------------------------- volumes
def _read(path: str, deep: bool) -> tuple[tuple[int, ...], np.ndarray, tuple[float, ...], np.ndarray | None]:
    """(shape, affine, voxel sizes, voxels or None); raises whatever the reader raises."""
    if path.endswith(_NIFTI):
        import nibabel as nib

        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        # voxel sizes as MONAI resamples with them: the lengths of the affine's columns (nibabel quietly
        # replaces a zero pixdim by 1, so the header's zooms can look fine when the affine is not)
        zooms = tuple(float(z) for z in np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0))
        data = np.asanyarray(img.dataobj) if deep else None
        return shape, np.asarray(img.affine, dtype=np.float64), zooms, data
    from monai.transforms import LoadImage  # NRRD / MHA / DICOM series, through ITK where installed

    arr, meta = LoadImage(image_only=False)(path)
    affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
    zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
    data = np.asarray(arr)
    return tuple(int(s) for s in data.shape), affine, zooms, data


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def inspect_volume(
    path: str,
    role: str,
    *,
    deep: bool = True,
    declared: Iterable[int] | None = None,
    case: str | None = None,
    dataset: str | None = None,
) -> tuple[VolumeInfo | None, list[Problem]]:
    """Check one image (``role="image"``) or label map (``role="label"``).

    Args:
        path: the file.
        deep: read the voxels too (NaN/inf, label values, truncated files), not only the header.
        declared: label ids the dataset declares (label maps only); ``None`` skips that check.
        case, dataset: recorded on each problem.

    Returns:
        ``(info, problems)``; ``info`` is ``None`` when the file cannot be used at all.
    """
    problems: list[Problem] = []

    def bad(message: str, severity: str = "error") -> None:
        problems.append(Problem(path, message, case, dataset, severity))

    what = "label map" if role == "label" else "image"
    if not os.path.isfile(path):
        bad(f"{what} not found")
        return None, problems
    if os.path.getsize(path) == 0:
        bad(f"{what} is an empty file (0 bytes)")
        return None, problems
    try:
        shape, affine, zooms, data = _read(path, deep)
    except Exception as e:  # nibabel, gzip, zlib, ITK and numpy raise many types for broken files
        detail = f"{type(e).__name__}: {e}".strip()
        hint = " (truncated or corrupt file?)" if deep else ""
        bad(f"cannot read {what}{hint}: {detail}")
        return None, problems
    shape3 = _squeeze_trailing(shape)
    if len(shape3) != 3:
        kind = "4D" if len(shape3) == 4 else f"{len(shape3)}D"
        bad(f"{kind} {what} of shape {shape} where a 3D volume is expected (one CT volume per file)")
        return None, problems
    if min(shape3) < 1:
        bad(f"{what} has an empty axis: shape {shape}")
        return None, problems
    spacing = tuple(zooms[:3])
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        bad(f"voxel size {_mm(spacing)} mm is zero, negative or not finite; the header's pixdim is broken")
    elif max(spacing) > MAX_SPACING_MM:
        bad(
            f"voxel size {_mm(spacing)} mm exceeds {MAX_SPACING_MM:g} mm; the header's spacing (or its unit) "
            "is likely wrong"
        )
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        bad("the affine (voxel-to-world matrix) is singular or not finite")
    info = VolumeInfo(shape3, affine.tolist(), spacing)
    if data is None:
        return info, problems
    data = data.reshape(shape3)
    if role == "image":
        _image_values(data, bad)
    else:
        _label_values(data, declared, bad)
    return info, problems


def _mm(spacing: Sequence[float]) -> str:
    return " x ".join(f"{s:g}" for s in spacing)


def _image_values(data: np.ndarray, bad: Callable[..., None]) -> None:
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        n_bad = int(data.size - finite.sum())
        if n_bad:
            bad(f"{n_bad} NaN/inf voxel(s) of {data.size}")
            data = data[finite]
            if data.size == 0:
                return
    elif not np.issubdtype(data.dtype, np.integer):
        bad(f"image has data type {data.dtype}; expected numbers (Hounsfield units)")
        return
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        bad(f"image is constant (every voxel is {lo:g}): a blank scan?", "warning")
    elif lo >= -1.0 and hi <= 1.0 + 1e-6:
        bad(
            f"values lie in [{lo:g}, {hi:g}]: this looks normalised, not CT in Hounsfield units "
            "(the HU window would clip it to one value)",
            "warning",
        )


def _label_values(data: np.ndarray, declared: Iterable[int] | None, bad: Callable[..., None]) -> None:
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.issubdtype(data.dtype, np.floating):
            bad(f"label map has data type {data.dtype}; expected integer label ids")
            return
        finite = np.isfinite(data)
        fractional = finite & (data != np.round(data))
        if not finite.all() or fractional.any():
            odd = data[~finite | fractional]
            bad(
                f"label map has {odd.size} non-integer voxel value(s), e.g. {odd.flat[0]!r}; label maps must hold "
                "integer label ids (was it resampled with linear interpolation?)"
            )
            return
        data = data.astype(np.int64)
    values = [int(v) for v in np.unique(data)]
    negative = [v for v in values if v < 0]
    if negative:
        bad(f"label map holds negative id(s) {negative[:5]}")
    if declared is not None:
        declared = set(declared)
        undeclared = [v for v in values if v > 0 and v not in declared]
        if undeclared:
            bad(
                f"label id(s) {undeclared[:10]} are not declared by the dataset "
                f"(declared: 0, {', '.join(str(i) for i in sorted(declared))})"
            )
    if values == [0]:
        bad("label map is empty (background only)", "warning")


def _pair(
    image: VolumeInfo, label: VolumeInfo, label_path: str, case: str, dataset: str | None
) -> list[Problem]:
    if image.shape != label.shape:
        return [
            Problem(
                label_path,
                f"label map shape {label.shape} differs from its image's {image.shape}",
                case,
                dataset,
            )
        ]
    a, b = np.asarray(image.affine), np.asarray(label.affine)
    if not np.allclose(a, b, rtol=_AFFINE_RTOL, atol=_AFFINE_ATOL):
        return [
            Problem(
                label_path,
                f"label map affine differs from its image's (origin {_mm(b[:3, 3].round(2))} vs "
                f"{_mm(a[:3, 3].round(2))} mm, voxel size {_mm(label.spacing)} vs {_mm(image.spacing)} mm): "
                "they are not on the same grid",
                case,
                dataset,
            )
        ]
    return []


# ------------------------------------------------------------------------------- result cache
class CheckCache:
    """Per-file check results keyed by (path, size, mtime, role, options), kept in one JSON file, so
    a second run over a large dataset does not read every volume again."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, Any] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                logger.warning("%s: unreadable check cache; checking every file again", self.path)
        self.dirty = False

    @staticmethod
    def key(path: str, role: str, deep: bool, declared: Iterable[int] | None) -> str | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        ids = ",".join(str(i) for i in sorted(declared)) if declared is not None else "-"
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{role}|{int(deep)}|{ids}"

    def get(self, key: str | None):
        if key is None or key not in self.entries:
            return None
        entry = self.entries[key]
        info = (
            VolumeInfo(
                tuple(entry["info"]["shape"]), entry["info"]["affine"], tuple(entry["info"]["spacing"])
            )
            if entry["info"]
            else None
        )
        return info, [Problem(**p) for p in entry["problems"]]

    def put(self, key: str | None, info: VolumeInfo | None, problems: list[Problem]) -> None:
        if key is None or self.path is None:
            return
        self.entries[key] = {
            "info": asdict(info) if info else None,
            "problems": [asdict(p) for p in problems],
        }
        self.dirty = True

    def save(self) -> None:
        if self.path is not None and self.dirty:
            write_json(self.path, self.entries)
            self.dirty = False


def _inspect_cached(cache: CheckCache | None, path: str, role: str, deep: bool, declared, case, dataset):
    key = CheckCache.key(path, role, deep, declared) if cache is not None else None
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        info, problems = hit
        return info, [Problem(p.path, p.message, case, dataset, p.severity) for p in problems]
    info, problems = inspect_volume(path, role, deep=deep, declared=declared, case=case, dataset=dataset)
    if cache is not None:
        cache.put(key, info, problems)
    return info, problems


@dataclass
class CaseFiles:
    """One case to check: an image and optionally a label map with the ids its dataset declares."""

    case: str
    image: str
    label: str | None = None
    dataset: str | None = None
    declared: tuple[int, ...] | None = None


def check_cases(
    cases: Sequence[CaseFiles],
    *,
    deep: bool = True,
    workers: int = 1,
    cache: CheckCache | None = None,
    progress: bool = False,
) -> list[Problem]:
    """Run the volume and pair checks on every case (threads: reading is mostly decompression and I/O)."""

    def one(c: CaseFiles) -> list[Problem]:
        image, problems = _inspect_cached(cache, c.image, "image", deep, None, c.case, c.dataset)
        if c.label is not None:
            label, more = _inspect_cached(cache, c.label, "label", deep, c.declared, c.case, c.dataset)
            problems += more
            if image is not None and label is not None:
                problems += _pair(image, label, c.label, c.case, c.dataset)
        return problems

    from tqdm.auto import tqdm

    out: list[Problem] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(one, cases)
        for problems in tqdm(results, total=len(cases), desc="check", disable=not progress, leave=False):
            out += problems
    if cache is not None:
        cache.save()
    return out


# ------------------------------------------------------------------------------------ reports
@dataclass
class CheckReport:
    """The problems found in one table or dataset."""

    target: str  # what was checked
    kind: str  # "report table" | "segmentation dataset"
    cases: int = 0  # cases (rows / image-label pairs) checked
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity != "error"]

    def bad_cases(self) -> set[tuple[str | None, str]]:
        """(dataset, case) of every case with an error."""
        return {(p.dataset, p.case) for p in self.errors if p.case is not None}

    def format(self, max_problems: int | None = None) -> str:
        n_err, n_warn = len(self.errors), len(self.warnings)
        head = (
            f"{self.kind} {self.target}: {self.cases} case(s) checked, {n_err} error(s), {n_warn} warning(s)"
        )
        if n_err:
            head += f" in {len(self.bad_cases())} case(s)" if self.bad_cases() else ""
        lines = [head]
        shown = self.errors + self.warnings
        for p in shown[:max_problems] if max_problems else shown:
            tag = "ERROR  " if p.severity == "error" else "warning"
            lines.append(f"  {tag} {p.path}: {p.message}")
        if max_problems and len(shown) > max_problems:
            lines.append(f"  ... and {len(shown) - max_problems} more")
        return "\n".join(lines)


PROBLEM_COLUMNS = ("severity", "dataset", "case", "path", "message")


def problems_csv(problems: Iterable[Problem], extra: dict[str, str] | None = None) -> str:
    """Problems as CSV text (``extra`` columns are prepended with constant values)."""
    buf = io.StringIO()
    extra = extra or {}
    writer = csv.writer(buf)
    writer.writerow([*extra, *PROBLEM_COLUMNS])
    for p in problems:
        writer.writerow([*extra.values(), *(getattr(p, c) or "" for c in PROBLEM_COLUMNS)])
    return buf.getvalue()


def write_problems_csv(path: str | Path, problems: Iterable[Problem]) -> None:
    atomic_write_text(path, problems_csv(problems))


def _strip_path(message: str, path: str | Path) -> str:
    """``message`` without a leading "PATH: " (the problem names the path already)."""
    for prefix in (str(path), str(Path(path).expanduser().resolve())):
        if message.startswith(prefix + ": "):
            return message[len(prefix) + 2 :]
    return message


# ------------------------------------------------------------------------------------- tables
def check_report_table(
    path: str | Path,
    image_column: str = "VolumeName",
    report_columns: Sequence[str] = ("Findings_EN", "Impressions_EN"),
    image_root: str | Path | None = None,
    *,
    deep: bool = True,
    workers: int = 1,
    cache: CheckCache | None = None,
    progress: bool = False,
) -> tuple[CheckReport, list[dict[str, Any]]]:
    """Every problem of an image–report table and its images.

    Returns:
        The report, and the usable records (as :func:`mosmos.table.read_report_table` gives them)
        with every case that has an error left out.
    """
    from mosmos.table import read_report_table

    report = CheckReport(str(path), "report table")
    try:
        records = read_report_table(path, image_column, report_columns, image_root, problems=report.problems)
    except MosmosError as e:  # the table as a whole is unusable: nothing more to check
        report.problems.append(Problem(str(path), _strip_path(str(e), path)))
        return report, []
    report.cases = len(records) + len({p.case for p in report.problems if p.case is not None})
    present = [r for r in records if (r["case_id"]) not in {p.case for p in report.errors}]
    report.problems += check_cases(
        [CaseFiles(r["case_id"], r["image"], dataset=Path(path).name) for r in present],
        deep=deep,
        workers=workers,
        cache=cache,
        progress=progress,
    )
    bad = {p.case for p in report.errors if p.case is not None}
    return report, [r for r in records if r["case_id"] not in bad]


# ----------------------------------------------------------------------------------- datasets
def dataset_case_files(dataset: Any, cases: Iterable[Any]) -> list[CaseFiles]:
    """:class:`CaseFiles` for :class:`mosmos.segdata.SegCase` s of ``dataset``."""
    declared = tuple(sorted(dataset.labels))
    return [CaseFiles(c.case_id, c.image, c.label, dataset.name, declared) for c in cases]


def check_seg_dataset(
    path: str | Path,
    vocab: Any = None,
    label_map: dict[str, str] | None = None,
    ignore: list[str] | None = None,
    labels: dict[int, str] | None = None,
    *,
    deep: bool = True,
    workers: int = 1,
    cache: CheckCache | None = None,
    progress: bool = False,
) -> CheckReport:
    """Every problem of a segmentation dataset (nnU-Net v2, MSD or datalist) and its volumes."""
    from mosmos.segdata import map_dataset_labels, read_seg_dataset

    report = CheckReport(str(path), "segmentation dataset")
    try:
        ds = read_seg_dataset(path, None, labels=labels, problems=report.problems)
    except MosmosError as e:
        report.problems.append(Problem(str(path), _strip_path(str(e), path)))
        return report
    report.target = f"{ds.name} ({ds.root})"
    if vocab is not None:
        try:
            map_dataset_labels(ds, vocab, label_map, ignore)
        except ConfigError as e:
            report.problems.append(Problem(ds.root, _strip_path(str(e), ds.root), None, ds.name))
    cases = ds.train + ds.test
    report.cases = len(cases)
    report.problems += check_cases(
        dataset_case_files(ds, cases), deep=deep, workers=workers, cache=cache, progress=progress
    )
    return report


def is_report_table(path: str | Path) -> bool:
    """A table file (rather than a dataset folder or a datalist / dataset.json)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() not in TABLE_SUFFIXES:
        return False
    if path.suffix.lower() != ".json":
        return True
    try:
        with path.open("rb") as f:
            head = f.read(4096).lstrip()
    except OSError:
        return False
    return head.startswith(b"[")  # a list of records; a datalist / dataset.json is an object


def raise_for_problems(
    problems: Sequence[Problem], what: str, max_shown: int = 10, hint: str | None = None
) -> None:
    """Raise one :class:`DataError` listing the errors among ``problems`` (with ``data.on_bad_case=error``)."""
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return
    by_case = defaultdict(list)
    for p in errors:
        by_case[(p.dataset, p.case)].append(p)
    lines = [f"  {p.path}: {p.message}" for p in errors[:max_shown]]
    more = f"\n  ... and {len(errors) - max_shown} more" if len(errors) > max_shown else ""
    raise DataError(
        f"{what}: {len(errors)} problem(s) in {len(by_case)} case(s):\n"
        + "\n".join(lines)
        + more
        + "\n"
        + (
            hint
            or "Fix them (`mosmos check PATH` lists every problem), or set data.on_bad_case=skip to train "
            "without these cases (they are listed in RUN/skipped.csv)."
        )
    )


def start_up_checks(
    cases: Sequence[CaseFiles],
    listing_problems: Sequence[Problem],
    *,
    mode: str,
    on_bad_case: str,
    what: str,
    cache_path: str | Path | None,
) -> tuple[set[tuple[str | None, str]], list[Problem]]:
    """The checks a training run does on the cases it uses.

    Args:
        cases: the cases the run reads.
        listing_problems: problems found while listing them (rows without images, duplicate ids ...).
        mode: ``data.check``: "full", "header" or "none".
        on_bad_case: "error" raises listing every problem; "skip" returns them.
        what: names the inputs in the error message.
        cache_path: JSON file of per-file results (a second run does not read every volume again).

    Returns:
        ``({(dataset, case) with an error}, every problem)``.
    """
    problems = list(listing_problems)
    if mode != "none":
        problems += check_cases(cases, deep=mode == "full", workers=2, cache=CheckCache(cache_path))
    for p in problems:
        if p.severity != "error":
            logger.warning("%s: %s", p.path, p.message)
    if on_bad_case == "error":
        raise_for_problems(problems, what)
    bad = {(p.dataset, p.case) for p in problems if p.severity == "error" and p.case is not None}
    table_level = [p for p in problems if p.severity == "error" and p.case is None]
    if table_level:  # not tied to one case: skipping cannot help
        raise_for_problems(table_level, what)
    return bad, problems


def save_report_json(path: str | Path, reports: Sequence[CheckReport]) -> None:
    write_json(
        path,
        [
            {
                "target": r.target,
                "kind": r.kind,
                "cases": r.cases,
                "problems": [asdict(p) for p in r.problems],
            }
            for r in reports
        ],
    )
