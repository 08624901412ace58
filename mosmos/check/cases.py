"""The volume and pair checks over many cases: threaded, with per-file results cached on disk."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mosmos.check.volumes import VolumeInfo, inspect_volume, pair_problems
from mosmos.errors import Problem
from mosmos.io import write_json

logger = logging.getLogger("mosmos")


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
                problems += pair_problems(image, label, c.label, c.case, c.dataset)
        return problems

    out: list[Problem] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(one, cases)
        for problems in tqdm(results, total=len(cases), desc="check", disable=not progress, leave=False):
            out += problems
    if cache is not None:
        cache.save()
    return out
