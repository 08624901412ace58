"""Radiology report -> per-organ tags (MOSMOS report supervision).

For every organ of the vocabulary a report yields two ternary tags, as in MOSMOS (Huang et
al., "Multi-Organ Segmentation Meets Vision-Language Pretraining", 2024), whose pixel-tag
attention learns them from the image:

- ``present``: 1 visible in the scan, 0 absent (resected, congenitally missing), -1 unknown
  (not mentioned, or stated to lie outside the field of view);
- ``abnormal``: 1 with a finding, 0 described as normal, -1 unknown.

The parser is rule based, sentence by sentence, in the spirit of NegEx (Chapman et al., 2001):
organ mentions come from the vocabulary's synonyms (longest match first, plurals allowed) in
:mod:`mosmos.pretrain.tag_parser`; findings, normal cues, negation cues and their scope,
resection and field-of-view phrases come from the lexicon in :mod:`mosmos.pretrain.tag_lexicon`,
read per sentence by :mod:`mosmos.pretrain.tag_sentences`. Statements about one organ combine as:
absent beats present; an explicit description beats "outside the field of view"; abnormal
beats normal; a catch-all sentence ("Otherwise unremarkable.") marks every organ the report
says nothing else about as present and normal.

This module is the parser's entry: one report, a corpus as a tag matrix, and its frequencies.

Example:
    >>> from mosmos.vocabulary import load_vocabulary
    >>> tags = parse_report("Status post splenectomy. No focal hepatic lesion.", load_vocabulary())
    >>> tags.get("spleen"), tags.get("liver"), tags.get("pancreas")
    ((0, -1), (1, 0), (-1, -1))
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import numpy as np

from mosmos.pretrain.tag_parser import ABNORMAL, ABSENT, NORMAL, PRESENT, UNKNOWN, ReportTags, TagParser
from mosmos.vocabulary import Organ, Vocabulary


@lru_cache(maxsize=8)
def _parser_for(organs: tuple[Organ, ...]) -> TagParser:
    return TagParser(Vocabulary(list(organs)))


def parse_report(text: str, vocabulary: Vocabulary) -> ReportTags:
    """Tag one report with a parser cached per vocabulary (see :class:`TagParser`)."""
    return _parser_for(tuple(vocabulary.organs)).parse(text)


def tag_matrix(texts: Iterable[str], vocabulary: Vocabulary) -> np.ndarray:
    """Tags of many reports: int8 ``[N, n_organs, 2]`` (``present``, ``abnormal``)."""
    parser = _parser_for(tuple(vocabulary.organs))
    rows = [parser.parse(t).as_array() for t in texts]
    if not rows:
        return np.zeros((0, len(vocabulary), 2), dtype=np.int8)
    return np.stack(rows).astype(np.int8)


def tag_frequencies(matrix: np.ndarray, vocabulary: Vocabulary) -> list[dict]:
    """Per-organ counts of each tag value, to check a corpus before training.

    Returns one dict per organ, in vocabulary order, with ``organ``, ``n`` (reports) and the
    counts ``present``, ``absent``, ``present_unknown``, ``abnormal``, ``normal``,
    ``abnormal_unknown``.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 3 or matrix.shape[1:] != (len(vocabulary), 2):
        raise ValueError(f"expected a tag matrix of shape [N, {len(vocabulary)}, 2], got {matrix.shape}")
    rows = []
    for i, name in enumerate(vocabulary.names):
        p, a = matrix[:, i, 0], matrix[:, i, 1]
        rows.append(
            {
                "organ": name,
                "n": int(matrix.shape[0]),
                "present": int((p == PRESENT).sum()),
                "absent": int((p == ABSENT).sum()),
                "present_unknown": int((p == UNKNOWN).sum()),
                "abnormal": int((a == ABNORMAL).sum()),
                "normal": int((a == NORMAL).sum()),
                "abnormal_unknown": int((a == UNKNOWN).sum()),
            }
        )
    return rows


__all__ = ["parse_report", "tag_frequencies", "tag_matrix"]
