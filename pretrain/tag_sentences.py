"""One report sentence for the tag parser: splitting, cue spans and their negation scope, groups.

A report is split into lower-cased sentences (:func:`sentences`). In each sentence the organ
mentions found by :class:`mosmos.pretrain.tag_parser.TagParser` are grouped when coordinated
(:func:`group_mentions`), each group owns the text up to the next clause boundary
(:func:`clause_cuts`), and :class:`Cues` finds the finding, normal, negation, absence and
field-of-view phrases of :mod:`mosmos.pretrain.tag_lexicon` with the NegEx-style scope of each
negation (Chapman et al., 2001).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

from mosmos.pretrain import tag_lexicon as lex


@dataclass
class Mention:
    """An organ term found in a sentence, and the vocabulary indices it names."""

    start: int
    end: int
    organs: tuple[int, ...]
    pair: bool  # a side-less term of a left/right pair ("kidneys", "renal", "adrenal")
    implied: bool = False  # a finding word that locates an organ ("emphysema"), no organ name


@dataclass
class Span:
    """A cue phrase in a sentence; ``negated`` when a negation's scope covers it."""

    start: int
    end: int
    negated: bool = False


def norm(text: str) -> str:
    """Lower-cased text with runs of spaces and hyphens as one space (``"Gall-bladder"`` -> ``"gall bladder"``)."""
    return re.sub(r"[\s-]+", " ", text.strip().lower())


def spans(pattern: re.Pattern, text: str) -> list[Span]:
    """Every match of ``pattern`` in ``text`` as a :class:`Span`."""
    return [Span(m.start(), m.end()) for m in pattern.finditer(text)]


def overlaps(span: Span, others: Iterable[Span]) -> bool:
    """Whether ``span`` shares a character with any of ``others``."""
    return any(span.start < o.end and o.start < span.end for o in others)


def inside(span: Span, mentions: Iterable[Mention]) -> bool:
    """Whether ``span`` lies within an organ mention ("splenomegaly" inside a term is the term's own)."""
    return any(m.start <= span.start and span.end <= m.end for m in mentions)


class Cues:
    """Finding, normal, negation, absence and field-of-view cues of one sentence, with scope.

    Args:
        s: the sentence, lower-cased.
        mentions: its organ mentions, in order.
    """

    def __init__(self, s: str, mentions: list[Mention]) -> None:
        self.out_of_view = spans(lex.OUT_OF_VIEW_RE, s)
        pseudo = spans(lex.PSEUDO_NEGATION_RE, s)
        post = [x for x in spans(lex.POST_NEGATION_RE, s) if not overlaps(x, self.out_of_view)]
        strong_normal = spans(lex.NORMAL_FORM_RE, s)
        self.findings = [
            x for x in spans(lex.FINDING_RE, s) if not overlaps(x, strong_normal + self.out_of_view + pseudo)
        ]
        self.normal = strong_normal + [
            x for x in spans(lex.NORMAL_RE, s) if not overlaps(x, self.findings + strong_normal)
        ]
        self.definite_absent = spans(lex.DEFINITE_ABSENCE_RE, s)
        blocked = self.out_of_view + pseudo + post + strong_normal + self.findings + self.definite_absent
        pre = [x for x in spans(lex.PRE_NEGATION_RE, s) if not overlaps(x, blocked)]
        terminators = spans(lex.TERMINATOR_RE, s)

        def terminated(a: int, b: int) -> bool:
            return any(a <= t.start < b for t in terminators)

        for f in self.findings:
            f.negated = any(c.end <= f.start and not terminated(c.end, f.start) for c in pre)
        # A post-position cue negates the findings just before it ("splenomegaly is not seen");
        # with none before it, the organ itself is not seen ("the spleen is not seen").
        self.soft_absent: list[Span] = []
        for cue in post:
            start = max((b.end for b in spans(lex.BACKWARD_BOUNDARY_RE, s[: cue.start])), default=0)
            scoped = [f for f in self.findings if start <= f.start and f.end <= cue.start]
            for f in scoped:
                f.negated = True
            if not scoped:
                self.soft_absent.append(cue)
        # "No spleen is identified", "absence of the gallbladder": a negation whose object is
        # the organ itself, with no finding in its scope.
        self.negated_mentions: list[Mention] = []
        for cue in pre:
            after = lex.DETERMINERS_RE.match(s, cue.end)
            pos = after.end() if after else cue.end
            target = next((m for m in mentions if m.start == pos), None)
            if target is None:
                continue
            in_scope = [f for f in self.findings if f.start >= cue.end and not terminated(cue.end, f.start)]
            if not in_scope:
                self.negated_mentions.append(target)


def sentences(text: str) -> list[str]:
    """Lower-cased sentences of a report; section headers and brackets become sentence or clause breaks."""
    text = lex.SECTION_RE.sub(". ", str(text or "").lower())
    text = re.sub(r"[()\[\]]", ", ", text)
    parts = (re.sub(r"\s+", " ", p).strip(" ,:") for p in lex.SENTENCE_SPLIT_RE.split(text))
    return [p for p in parts if p]


def group_mentions(s: str, mentions: list[Mention], cues: Cues) -> list[list[Mention]]:
    """Coordinated mentions ("the liver, spleen and pancreas") share one predicate.

    Two mentions joined by connectors stay apart when each has its own predicate: "no lesion
    in the liver, and the spleen is enlarged".
    """
    content = cues.findings + cues.normal + cues.soft_absent + cues.out_of_view + cues.definite_absent
    content = [c for c in content if not inside(c, mentions)]
    ends = [m.start for m in mentions[1:]] + [len(s)]

    def has_content(a: int, b: int) -> bool:
        return any(a <= c.start < b for c in content)

    groups: list[list[Mention]] = []
    group_start = 0
    for m, end in zip(mentions, ends, strict=True):
        coordinated = groups and lex.CONNECTOR_RE.fullmatch(s[groups[-1][-1].end : m.start])
        if coordinated and not (has_content(group_start, groups[-1][0].start) and has_content(m.end, end)):
            groups[-1].append(m)
            continue
        group_start = groups[-1][-1].end if groups else 0
        groups.append([m])
    return groups


def clause_cuts(s: str, groups: list[list[Mention]]) -> list[int]:
    """Segment limits: each group owns the text up to the last clause boundary before the next."""
    cuts = [0]
    for a, b in pairwise(groups):
        gap_start, gap_end = a[-1].end, b[0].start
        bounds = list(lex.BOUNDARY_RE.finditer(s, gap_start, gap_end))
        cuts.append(bounds[-1].start() if bounds else gap_end)
    cuts.append(len(s) + 1)
    return cuts


def is_catch_all(sentence: str, has_organ: bool) -> bool:
    """Whether a sentence covers every organ not otherwise described ("Otherwise unremarkable.")."""
    if lex.CATCH_ALL_ORGANS_RE.search(sentence):
        return True
    return not has_organ and bool(lex.CATCH_ALL_RE.search(sentence))
