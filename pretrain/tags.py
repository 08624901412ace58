"""Radiology report -> per-organ tags (MOSMOS report supervision).

For every organ of the vocabulary a report yields two ternary tags, as in MOSMOS (Huang et
al., "Multi-Organ Segmentation Meets Vision-Language Pretraining", 2024), whose pixel-tag
attention learns them from the image:

- ``present``: 1 visible in the scan, 0 absent (resected, congenitally missing), -1 unknown
  (not mentioned, or stated to lie outside the field of view);
- ``abnormal``: 1 with a finding, 0 described as normal, -1 unknown.

The parser is rule based, sentence by sentence, in the spirit of NegEx (Chapman et al., 2001):
organ mentions come from the vocabulary's synonyms (longest match first, plurals allowed);
findings, normal cues, negation cues and their scope, resection and field-of-view phrases
come from the lexicon in :mod:`mosmos.pretrain.tag_lexicon`. Statements about one organ combine as:
absent beats present; an explicit description beats "outside the field of view"; abnormal
beats normal; a catch-all sentence ("Otherwise unremarkable.") marks every organ the report
says nothing else about as present and normal.

Example:
    >>> from mosmos.vocabulary import load_vocabulary
    >>> tags = parse_report("Status post splenectomy. No focal hepatic lesion.", load_vocabulary())
    >>> tags.get("spleen"), tags.get("liver"), tags.get("pancreas")
    ((0, -1), (1, 0), (-1, -1))
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

import numpy as np

from mosmos.pretrain import tag_lexicon as lex
from mosmos.vocabulary import Organ, Vocabulary

PRESENT, ABSENT, UNKNOWN = 1, 0, -1
ABNORMAL, NORMAL = 1, 0
_SIDES = ("right", "left")


@dataclass
class ReportTags:
    """Tags of one report, in vocabulary order: ``present`` and ``abnormal`` in {1, 0, -1}."""

    present: np.ndarray
    abnormal: np.ndarray
    names: tuple[str, ...] = ()

    def as_array(self) -> np.ndarray:
        """``[n_organs, 2]`` int8: column 0 ``present``, column 1 ``abnormal``."""
        return np.stack([self.present, self.abnormal], axis=1).astype(np.int8)

    def get(self, organ: str) -> tuple[int, int]:
        """``(present, abnormal)`` of one organ by canonical name."""
        if organ not in self.names:
            raise KeyError(f"unknown organ {organ!r}; these tags cover {list(self.names)}")
        i = self.names.index(organ)
        return int(self.present[i]), int(self.abnormal[i])


@dataclass
class _Mention:
    start: int
    end: int
    organs: tuple[int, ...]
    pair: bool  # a side-less term of a left/right pair ("kidneys", "renal", "adrenal")


@dataclass
class _Span:
    start: int
    end: int
    negated: bool = False


@dataclass
class _OrganState:
    """Everything the report said about one organ."""

    absent: bool = False
    described: bool = False
    abnormal: int = UNKNOWN
    out_of_view: bool = False
    ambiguous: bool = False  # mentioned, but which side is not said ("status post nephrectomy")

    def describe(self, vote: int) -> None:
        self.described = True
        self.abnormal = max(self.abnormal, vote)


def _side_free(term: str, side: str) -> str | None:
    """``"right renal"`` -> ``"renal"``, ``"kidney on the right"`` -> ``"kidney"``; None if no side."""
    m = re.fullmatch(rf"{side}[\s-]+(?:sided\s+)?(.+)", term) or re.fullmatch(
        rf"(.+?)\s+on\s+the\s+{side}", term
    )
    return m.group(1) if m else None


def _norm(text: str) -> str:
    return re.sub(r"[\s-]+", " ", text.strip().lower())


def _spans(pattern: re.Pattern, text: str) -> list[_Span]:
    return [_Span(m.start(), m.end()) for m in pattern.finditer(text)]


def _overlaps(span: _Span, others: Iterable[_Span]) -> bool:
    return any(span.start < o.end and o.start < span.end for o in others)


def _inside(span: _Span, mentions: Iterable[_Mention]) -> bool:
    return any(m.start <= span.start and span.end <= m.end for m in mentions)


class TagParser:
    """Report tagger for one vocabulary; compiles its organ patterns once.

    Args:
        vocabulary: the organs to tag, in output order. Each organ is found in reports by its
            ``display`` name and ``synonyms``; for left/right pairs (``kidney_right`` /
            ``kidney_left``) the side-less form of their synonyms ("kidneys", "renal") refers to
            both, unless the sentence names one side.
    """

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary
        self.names = tuple(vocabulary.names)
        self._terms: dict[str, tuple[int, ...]] = {}
        self._pair_terms: set[str] = set()
        self._side_of: dict[int, str] = {}
        for i, organ in enumerate(vocabulary.organs):
            for term in self._organ_terms(organ):
                self._terms[term] = tuple(sorted({*self._terms.get(term, ()), i}))
        self._add_pair_terms(vocabulary.organs)
        for term in lex.NON_ORGAN_PHRASES:
            self._terms.setdefault(_norm(term), ())
        alternatives = sorted(self._terms, key=len, reverse=True)
        body = "|".join(r"[\s-]+".join(re.escape(w) for w in t.split(" ")) for t in alternatives)
        self._organ_re = re.compile(rf"\b(?:{body})(?:e?s)?\b")

    @staticmethod
    def _organ_terms(organ: Organ) -> set[str]:
        terms = {_norm(s) for s in organ.synonyms} | {_norm(organ.display)}
        if "_" not in organ.name:
            terms.add(_norm(organ.name))
        return {t for t in terms if t}

    def _add_pair_terms(self, organs: list[Organ]) -> None:
        """Side-less terms shared by a right and a left organ map to both."""
        for i, organ in enumerate(organs):
            for side in _SIDES:
                if any(_side_free(t, side) for t in self._organ_terms(organ)):
                    self._side_of[i] = side
        for i, right in enumerate(organs):
            if self._side_of.get(i) != "right":
                continue
            right_free = {_side_free(t, "right") for t in self._organ_terms(right)} - {None}
            for j, left in enumerate(organs):
                if self._side_of.get(j) != "left":
                    continue
                shared = right_free & ({_side_free(t, "left") for t in self._organ_terms(left)} - {None})
                for term in shared:
                    if term not in self._terms:
                        self._terms[term] = (i, j)
                        self._pair_terms.add(term)

    # ------------------------------------------------------------------ public API

    def parse(self, text: str) -> ReportTags:
        """Tag one report (Findings and Impression, section headers allowed)."""
        states = [_OrganState() for _ in self.names]
        catch_all = False
        previous: tuple[int, ...] = ()
        for sentence in _sentences(text):
            mentions = self._mentions(sentence)
            if not mentions and previous and lex.ANAPHORA_RE.match(sentence):
                mentions = [_Mention(0, 0, previous, False)]
            elif not mentions or lex.CATCH_ALL_ORGANS_RE.search(sentence):
                catch_all |= _is_catch_all(sentence, has_organ=bool(mentions))
            previous = self._tag_sentence(sentence, mentions, states) if mentions else ()
        present = np.full(len(self.names), UNKNOWN, dtype=np.int8)
        abnormal = np.full(len(self.names), UNKNOWN, dtype=np.int8)
        for i, st in enumerate(states):
            if st.absent:
                present[i] = ABSENT
            elif st.described:
                present[i], abnormal[i] = PRESENT, st.abnormal
                if catch_all and st.abnormal == UNKNOWN:
                    abnormal[i] = NORMAL
            elif catch_all and not (st.out_of_view or st.ambiguous):
                present[i], abnormal[i] = PRESENT, NORMAL
        return ReportTags(present=present, abnormal=abnormal, names=self.names)

    # ------------------------------------------------------------------ one sentence

    def _mentions(self, sentence: str) -> list[_Mention]:
        found = []
        for m in self._organ_re.finditer(sentence):
            key = _norm(m.group(0))
            for candidate in (key, key[:-1], key[:-2]):
                if candidate in self._terms:
                    break
            organs = self._terms.get(candidate, ())
            if organs:
                found.append(_Mention(m.start(), m.end(), organs, candidate in self._pair_terms))
        return found

    def _tag_sentence(self, s: str, mentions: list[_Mention], states: list[_OrganState]) -> tuple[int, ...]:
        cues = _Cues(s, mentions)
        groups = _group(s, mentions, cues)
        cuts = _cuts(s, groups)
        last: tuple[int, ...] = ()
        for group, (lo, hi) in zip(groups, pairwise(cuts), strict=True):
            last = self._tag_group(s, group, lo, hi, mentions, cues, states)
        return last

    def _tag_group(
        self,
        s: str,
        group: list[_Mention],
        lo: int,
        hi: int,
        mentions: list[_Mention],
        cues: _Cues,
        states: list[_OrganState],
    ) -> tuple[int, ...]:
        others = [m for m in mentions if m not in group]

        def in_segment(spans: list[_Span]) -> list[_Span]:
            return [x for x in spans if lo <= x.start < hi and not _inside(x, mentions)]

        segment = s[lo:hi]
        partial = bool(lex.PARTIAL_RE.search(segment))
        out_of_view = bool(in_segment(cues.out_of_view))
        findings = in_segment(cues.findings)
        normal = bool(in_segment(cues.normal))
        definite_absent = bool(in_segment(cues.definite_absent))
        soft_absent = not out_of_view and (
            bool(in_segment(cues.soft_absent)) or any(m in cues.negated_mentions for m in group)
        )
        if partial and definite_absent:  # "partially resected": still there, and not normal
            findings, definite_absent = [*findings, _Span(lo, lo)], False
        touched: list[int] = []
        for mention in group:
            organs = self._resolve_side(s, mention, lo, hi, group, others, mentions)
            own = [f for f in cues.findings if mention.start <= f.start and f.end <= mention.end]
            resected = bool(lex.RESECTION_RE.search(s[mention.start : mention.end]))
            if resected and partial:
                own, resected = [*own, _Span(mention.start, mention.start)], False
            if resected and mention.pair and organs is None:
                for i in mention.organs:
                    states[i].ambiguous = True
                continue
            for i in organs or mention.organs:
                touched.append(i)
                st = states[i]
                if resected or definite_absent or soft_absent:
                    st.absent = True
                    continue
                spans = findings + own
                abnormal = any(not f.negated for f in spans)
                is_normal = normal or any(f.negated for f in spans)
                if out_of_view:
                    st.out_of_view = True
                    if not (abnormal or is_normal):
                        continue
                st.describe(ABNORMAL if abnormal else NORMAL if is_normal else UNKNOWN)
        return tuple(dict.fromkeys(touched))

    def _resolve_side(
        self,
        s: str,
        mention: _Mention,
        lo: int,
        hi: int,
        group: list[_Mention],
        others: list[_Mention],
        mentions: list[_Mention],
    ) -> tuple[int, ...] | None:
        """Organs a side-less pair term refers to; None when the side cannot be told."""
        if not mention.pair:
            return mention.organs
        words = set()
        for m in lex.SIDE_RE.finditer(s, lo, hi):
            if not _inside(_Span(m.start(), m.end()), mentions):
                words.add(m.group(1) or "both")
        if "both" in words or {"right", "left"} <= words:
            return mention.organs
        sides = words & set(_SIDES)
        if not sides and lex.RESECTION_RE.search(s[mention.start : mention.end]):
            named = {
                self._side_of[i]
                for m in (*group, *others)
                if not m.pair
                for i in m.organs
                if i in self._side_of
            }
            named &= {self._side_of[i] for i in mention.organs}
            if len(named) != 1:
                return None
            sides = named
        if not sides:
            return mention.organs
        chosen = tuple(i for i in mention.organs if self._side_of.get(i) in sides)
        return chosen or mention.organs


class _Cues:
    """Finding, normal, negation, absence and field-of-view cues of one sentence, with scope."""

    def __init__(self, s: str, mentions: list[_Mention]) -> None:
        self.out_of_view = _spans(lex.OUT_OF_VIEW_RE, s)
        pseudo = _spans(lex.PSEUDO_NEGATION_RE, s)
        post = [x for x in _spans(lex.POST_NEGATION_RE, s) if not _overlaps(x, self.out_of_view)]
        strong_normal = _spans(lex.NORMAL_FORM_RE, s)
        self.findings = [
            x
            for x in _spans(lex.FINDING_RE, s)
            if not _overlaps(x, strong_normal + self.out_of_view + pseudo)
        ]
        self.normal = strong_normal + [
            x for x in _spans(lex.NORMAL_RE, s) if not _overlaps(x, self.findings + strong_normal)
        ]
        self.definite_absent = _spans(lex.DEFINITE_ABSENCE_RE, s)
        blocked = self.out_of_view + pseudo + post + strong_normal + self.findings + self.definite_absent
        pre = [x for x in _spans(lex.PRE_NEGATION_RE, s) if not _overlaps(x, blocked)]
        terminators = _spans(lex.TERMINATOR_RE, s)

        def terminated(a: int, b: int) -> bool:
            return any(a <= t.start < b for t in terminators)

        for f in self.findings:
            f.negated = any(c.end <= f.start and not terminated(c.end, f.start) for c in pre)
        # A post-position cue negates the findings just before it ("splenomegaly is not seen");
        # with none before it, the organ itself is not seen ("the spleen is not seen").
        self.soft_absent = []
        for cue in post:
            start = max((b.end for b in _spans(lex.BACKWARD_BOUNDARY_RE, s[: cue.start])), default=0)
            scoped = [f for f in self.findings if start <= f.start and f.end <= cue.start]
            for f in scoped:
                f.negated = True
            if not scoped:
                self.soft_absent.append(cue)
        # "No spleen is identified", "absence of the gallbladder": a negation whose object is
        # the organ itself, with no finding in its scope.
        self.negated_mentions = []
        for cue in pre:
            after = lex.DETERMINERS_RE.match(s, cue.end)
            pos = after.end() if after else cue.end
            target = next((m for m in mentions if m.start == pos), None)
            if target is None:
                continue
            in_scope = [f for f in self.findings if f.start >= cue.end and not terminated(cue.end, f.start)]
            if not in_scope:
                self.negated_mentions.append(target)


def _sentences(text: str) -> list[str]:
    text = lex.SECTION_RE.sub(". ", str(text or "").lower())
    text = re.sub(r"[()\[\]]", ", ", text)
    parts = (re.sub(r"\s+", " ", p).strip(" ,:") for p in lex.SENTENCE_SPLIT_RE.split(text))
    return [p for p in parts if p]


def _group(s: str, mentions: list[_Mention], cues: _Cues) -> list[list[_Mention]]:
    """Coordinated mentions ("the liver, spleen and pancreas") share one predicate.

    Two mentions joined by connectors stay apart when each has its own predicate: "no lesion
    in the liver, and the spleen is enlarged".
    """
    content = cues.findings + cues.normal + cues.soft_absent + cues.out_of_view + cues.definite_absent
    content = [c for c in content if not _inside(c, mentions)]
    ends = [m.start for m in mentions[1:]] + [len(s)]

    def has_content(a: int, b: int) -> bool:
        return any(a <= c.start < b for c in content)

    groups: list[list[_Mention]] = []
    group_start = 0
    for m, end in zip(mentions, ends, strict=True):
        coordinated = groups and lex.CONNECTOR_RE.fullmatch(s[groups[-1][-1].end : m.start])
        if coordinated and not (has_content(group_start, groups[-1][0].start) and has_content(m.end, end)):
            groups[-1].append(m)
            continue
        group_start = groups[-1][-1].end if groups else 0
        groups.append([m])
    return groups


def _cuts(s: str, groups: list[list[_Mention]]) -> list[int]:
    """Segment limits: each group owns the text up to the last clause boundary before the next."""
    cuts = [0]
    for a, b in pairwise(groups):
        gap_start, gap_end = a[-1].end, b[0].start
        bounds = list(lex.BOUNDARY_RE.finditer(s, gap_start, gap_end))
        cuts.append(bounds[-1].start() if bounds else gap_end)
    cuts.append(len(s) + 1)
    return cuts


def _is_catch_all(sentence: str, has_organ: bool) -> bool:
    if lex.CATCH_ALL_ORGANS_RE.search(sentence):
        return True
    return not has_organ and bool(lex.CATCH_ALL_RE.search(sentence))


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


__all__ = ["ReportTags", "TagParser", "parse_report", "tag_frequencies", "tag_matrix"]
