"""The report tagger: organ mentions, left/right resolution and how statements about an organ combine.

:class:`TagParser` finds the vocabulary's organs in each sentence (longest synonym first, plurals
allowed), reads each group of mentions with the cues of :mod:`mosmos.pretrain.tag_sentences`, and
combines what the report says about one organ into :class:`ReportTags` (rules in
:mod:`mosmos.pretrain.tags`).

Chest reports: a finding word of the vocabulary's ``implied_by`` ("emphysema", "atelectasis")
stands for its organ (both lungs unless a side is said) when the sentence names none of that
organ's terms. A report covers the chest, the abdomen and pelvis, or both (:meth:`TagParser.coverage`);
catch-all sentences and implied organs reach only the organs of covered regions, so a chest
report's "remaining abdominal organs are unremarkable" marks no abdominal organ present.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from mosmos.pretrain import tag_lexicon as lex
from mosmos.pretrain.tag_sentences import (
    Cues,
    Mention,
    Span,
    clause_cuts,
    group_mentions,
    inside,
    is_catch_all,
    norm,
    sentences,
)
from mosmos.vocabulary import REGIONS, Organ, Vocabulary

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


class TagParser:
    """Report tagger for one vocabulary; compiles its organ patterns once.

    Args:
        vocabulary: the organs to tag, in output order. Each organ is found in reports by its
            ``display`` name and ``synonyms``; for left/right pairs (``kidney_right`` /
            ``kidney_left``) the side-less form of their synonyms ("kidneys", "renal") refers to
            both, unless the sentence names one side.

    Example:
        >>> from mosmos.vocabulary import load_vocabulary
        >>> TagParser(load_vocabulary()).parse("Right renal cyst.").get("kidney_right")
        (1, 1)
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
        self._implied: set[str] = set()
        implied: dict[str, set[int]] = {}
        for i, organ in enumerate(vocabulary.organs):
            for term in filter(None, (norm(t) for t in organ.implied_by)):
                implied.setdefault(term, set()).add(i)
        for term, organs in implied.items():
            if term not in self._terms:  # an organ's own name wins over a finding word
                self._terms[term] = tuple(sorted(organs))
                self._implied.add(term)
                if frozenset(organs) in self._pairs:
                    self._pair_terms.add(term)
        for term in lex.NON_ORGAN_PHRASES:
            self._terms.setdefault(norm(term), ())
        alternatives = sorted(self._terms, key=len, reverse=True)
        body = "|".join(r"[\s-]+".join(re.escape(w) for w in t.split(" ")) for t in alternatives)
        self._organ_re = re.compile(rf"\b(?:{body})(?:e?s)?\b")

    @staticmethod
    def _organ_terms(organ: Organ) -> set[str]:
        terms = {norm(s) for s in organ.synonyms} | {norm(organ.display)}
        if "_" not in organ.name:
            terms.add(norm(organ.name))
        return {t for t in terms if t}

    def _add_pair_terms(self, organs: list[Organ]) -> None:
        """Side-less terms shared by a right and a left organ map to both."""
        self._pairs: set[frozenset[int]] = set()
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
                if shared:
                    self._pairs.add(frozenset((i, j)))
                for term in shared:
                    if term not in self._terms:
                        self._terms[term] = (i, j)
                        self._pair_terms.add(term)

    # ------------------------------------------------------------------ public API

    @staticmethod
    def coverage(text: str) -> frozenset[str]:
        """Body regions a report's scan covers: the chest for a chest report (CT-RATE), the abdomen
        and pelvis for any other, all three when a chest report also names an abdominal scan."""
        text = str(text or "").lower()
        chest = bool(lex.CHEST_REPORT_RE.search(text))
        if not chest:
            return frozenset(("abdomen", "pelvis"))
        return frozenset(REGIONS) if lex.ABDOMEN_SCAN_RE.search(text) else frozenset(("chest",))

    def parse(self, text: str) -> ReportTags:
        """Tag one report (Findings and Impression, section headers allowed)."""
        states = [_OrganState() for _ in self.names]
        covered = self.coverage(text)
        # regions a catch-all sentence speaks of ("the remaining abdominal organs": abdomen and
        # pelvis), and of those the regions the scan covers, whose undescribed organs it marks
        catch_all: set[str] = set()
        catch_all_regions: set[str] = set()
        previous: tuple[int, ...] = ()
        for sentence in sentences(text):
            mentions = self._mentions(sentence, covered)
            if not mentions and previous and lex.ANAPHORA_RE.match(sentence):
                mentions = [Mention(0, 0, previous, False)]
            elif (not mentions or lex.CATCH_ALL_ORGANS_RE.search(sentence)) and is_catch_all(
                sentence, has_organ=bool(mentions)
            ):
                named = {r for r, pattern in lex.CATCH_ALL_REGION_RES.items() if pattern.search(sentence)}
                catch_all |= named or set(REGIONS)
                catch_all_regions |= covered & named if named else covered
            previous = self._tag_sentence(sentence, mentions, states) if mentions else ()
        present = np.full(len(self.names), UNKNOWN, dtype=np.int8)
        abnormal = np.full(len(self.names), UNKNOWN, dtype=np.int8)
        for i, st in enumerate(states):
            if st.absent:
                present[i] = ABSENT
            elif st.described:
                present[i], abnormal[i] = PRESENT, st.abnormal
                if st.abnormal == UNKNOWN and self.vocabulary.in_regions(self.names[i], catch_all):
                    abnormal[i] = NORMAL
            elif self.vocabulary.in_regions(self.names[i], catch_all_regions) and not (
                st.out_of_view or st.ambiguous
            ):
                present[i], abnormal[i] = PRESENT, NORMAL
        return ReportTags(present=present, abnormal=abnormal, names=self.names)

    # ------------------------------------------------------------------ one sentence

    def _mentions(self, sentence: str, covered: frozenset[str]) -> list[Mention]:
        found = []
        for m in self._organ_re.finditer(sentence):
            key = norm(m.group(0))
            for candidate in (key, key[:-1], key[:-2]):
                if candidate in self._terms:
                    break
            organs = self._terms.get(candidate, ())
            if organs:
                found.append(
                    Mention(
                        m.start(), m.end(), organs, candidate in self._pair_terms, candidate in self._implied
                    )
                )
        # A finding word stands for its organ only when the sentence names none of that organ's
        # terms ("emphysema in the right lung" is about the right lung alone) and the scan covers it;
        # dropped, it stays a finding of whatever organ owns its clause.
        named = {i for x in found if not x.implied for i in x.organs}
        return [
            x
            for x in found
            if not x.implied
            or (
                not named & set(x.organs)
                and any(self.vocabulary.in_regions(self.names[i], covered) for i in x.organs)
            )
        ]

    def _tag_sentence(self, s: str, mentions: list[Mention], states: list[_OrganState]) -> tuple[int, ...]:
        cues = Cues(s, mentions)
        groups = group_mentions(s, mentions, cues)
        cuts = clause_cuts(s, groups)
        last: tuple[int, ...] = ()
        for group, (lo, hi) in zip(groups, pairwise(cuts), strict=True):
            last = self._tag_group(s, group, lo, hi, mentions, cues, states)
        return last

    def _tag_group(
        self,
        s: str,
        group: list[Mention],
        lo: int,
        hi: int,
        mentions: list[Mention],
        cues: Cues,
        states: list[_OrganState],
    ) -> tuple[int, ...]:
        others = [m for m in mentions if m not in group]

        def in_segment(found: list[Span]) -> list[Span]:
            return [x for x in found if lo <= x.start < hi and not inside(x, mentions)]

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
            findings, definite_absent = [*findings, Span(lo, lo)], False
        touched: list[int] = []
        for mention in group:
            organs = self._resolve_side(s, mention, lo, hi, group, others, mentions)
            own = [f for f in cues.findings if mention.start <= f.start and f.end <= mention.end]
            resected = bool(lex.RESECTION_RE.search(s[mention.start : mention.end]))
            if resected and partial:
                own, resected = [*own, Span(mention.start, mention.start)], False
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
                found = findings + own
                abnormal = any(not f.negated for f in found)
                is_normal = normal or any(f.negated for f in found)
                if out_of_view:
                    st.out_of_view = True
                    if not (abnormal or is_normal):
                        continue
                st.describe(ABNORMAL if abnormal else NORMAL if is_normal else UNKNOWN)
        return tuple(dict.fromkeys(touched))

    def _resolve_side(
        self,
        s: str,
        mention: Mention,
        lo: int,
        hi: int,
        group: list[Mention],
        others: list[Mention],
        mentions: list[Mention],
    ) -> tuple[int, ...] | None:
        """Organs a side-less pair term refers to; None when the side cannot be told."""
        if not mention.pair:
            return mention.organs
        words = set()
        for m in lex.SIDE_RE.finditer(s, lo, hi):
            if not inside(Span(m.start(), m.end()), mentions):
                words.add(m.group(1) or "both")
        if "both" in words or {"right", "left"} <= words:
            return mention.organs
        sides = words & set(_SIDES)
        if not sides:
            # "the upper lobe of the right lung", "pleural effusion in the right hemithorax": the side
            # comes from the sentence's one-sided terms of the same pair, when they name one side
            named = {
                self._side_of[i]
                for m in (*group, *others)
                if not m.pair
                for i in m.organs
                if i in mention.organs and i in self._side_of
            }
            if len(named) == 1:
                sides = named
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
