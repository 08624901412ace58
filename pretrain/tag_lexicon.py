"""The English report lexicon behind :mod:`mosmos.pretrain.tags`: findings, normal and negation cues,
their scope terminators, resection and field-of-view phrases, catch-all sentences.

Organ names are not here: they come from the vocabulary (``configs/organs.yaml``). The finding
and normal cues live in :mod:`mosmos.pretrain.tag_findings` and are re-exported here. Every
pattern runs on lower-cased text, one sentence at a time.
"""

from __future__ import annotations

import re

from mosmos.pretrain.tag_findings import FINDING_RE as FINDING_RE
from mosmos.pretrain.tag_findings import NORMAL_FORM_RE as NORMAL_FORM_RE
from mosmos.pretrain.tag_findings import NORMAL_RE as NORMAL_RE
from mosmos.pretrain.tag_findings import _words

# Report structure ---------------------------------------------------------------------------

SECTION_RE = re.compile(
    r"\b(?:findings|impressions?|conclusions?|results?|report|opinion|summary|diagnosis)\s*:"
)
# Sentences end at ; ! ? and newlines, and at periods that are not decimal points ("2.5 cm").
SENTENCE_SPLIT_RE = re.compile(r"\.(?!\d)|[;!?\n\r]+")
# Phrases that look like an organ synonym but name something else ("superior vena cava"), or
# name a reading setting rather than an organ ("When examined in the lung parenchyma window; ...").
NON_ORGAN_PHRASES = (
    "superior vena cava",
    "svc",
    "vena cava superior",
    "pulmonary vein",
    "pulmonary veins",
    "lung parenchyma window",
    "parenchyma window",
    "parenchymal window",
    "lung window",
    "mediastinal window",
    "soft tissue window",
    "bone window",
)
# A sentence without an organ that continues the previous one ("It measures 16 cm.").
ANAPHORA_RE = re.compile(r"(?:it|they|this|these|which|its|their)\b")

# Mentions joined only by these words are coordinated and share a predicate
# ("the liver, spleen and pancreas are unremarkable", "liver dome and spleen tip").
CONNECTOR_RE = re.compile(
    r"(?:[\s,/&]|"
    + _words(
        "and",
        "or",
        "nor",
        "as well as",
        "the",
        "both",
        "either",
        "neither",
        "also",
        "its",
        "their",
        "of",
        "right",
        "left",
        "upper",
        "lower",
        "dome",
        "tip",
        "poles?",
        "lobes?",
        "head",
        "body",
        "tail",
        "neck",
        "hil(?:um|a)",
        "parenchyma",
        "portions?",
        "parts?",
        "segments?",
    )
    + r")*"
)
# Clause boundaries: between two organs, each owns the text up to the last of these.
BOUNDARY_RE = re.compile(
    r"[,;:]|" + _words("and", "or", "nor", "but", "while", "whereas", "although", "though", "however", "with")
)

# Laterality words that restrict a side-less pair term ("renal cyst on the left").
SIDE_RE = re.compile(r"\b(right|left)(?:[\s-]+sided)?\b|\b(?:bilateral(?:ly)?|both)\b")

# Negation ---------------------------------------------------------------------------------------

# Scope runs forward from these to the end of the sentence or a terminator.
PRE_NEGATION_RE = re.compile(
    _words(
        r"no",
        r"not",
        r"without",
        r"nor",
        r"neither",
        r"negative\s+for",
        r"free\s+of",
        r"absence\s+of",
        r"lack\s+of",
        r"never",
        r"none\s+of",
    )
)
# Negations that are not ("no change in the hepatic cyst", "a lesion cannot be excluded").
PSEUDO_NEGATION_RE = re.compile(
    _words(
        r"no\s+(?:significant\s+|interval\s+|appreciable\s+)?(?:change|increase|decrease|progression)",
        r"not\s+(?:significantly\s+)?changed",
        r"not\s+only",
        r"(?:cannot|can\s*not|could\s+not|can't)\s+(?:be\s+)?(?:excluded|ruled\s+out|exclude|rule\s+out)",
        r"not\s+(?:be\s+)?(?:excluded|ruled\s+out)",
    )
)
# After its object: negates the findings just before it, or says the organ itself is missing.
POST_NEGATION_RE = re.compile(
    _words(
        r"(?:not|no\s+longer)\s+(?:be\s+)?(?:clearly\s+|definitely\s+|separately\s+|convincingly\s+)?"
        r"(?:seen|visuali[sz]ed|identified|present|demonstrated|detected|noted|evident|appreciated"
        r"|depicted|delineated|visible|observed|identifiable|discernible)",
        r"absent",
        r"non-?visuali[sz](?:ed|ation)",
        r"missing",
        r"ruled\s+out",
    )
)
# Where a negation's scope stops.
TERMINATOR_RE = re.compile(
    _words(
        "but",
        "however",
        "although",
        "though",
        "except",
        r"apart\s+from",
        r"aside\s+from",
        "besides",
        "whereas",
        "while",
        "yet",
        "which",
        "whose",
        "nevertheless",
        "otherwise",
    )
    + r"|[,:]\s*(?=(?:the|there|a|an|with|it|its|mild|moderate|severe|marked)\b)"
    + r"|\band\s+(?=(?:the|there|a|an|its|it|mild|moderate|severe|marked|diffuse|multiple|several"
    r"|shows?|demonstrates?|contains?|has|have|is|are|was|were)\b)"
)
# Where a post-position negation's scope stops, looking back ("the liver is enlarged and ...").
BACKWARD_BOUNDARY_RE = re.compile(
    r"[,;:]|"
    + _words("but", "however", "although", "which", "while", "whereas", "with")
    + r"|(?<=ed)\s+and\b"
)
# Filler between a negation and the organ it denies ("no visible gallbladder").
DETERMINERS_RE = re.compile(
    r"(?:\s+(?:evidence\s+of|visible|identifiable|discrete|definite|residual|native|the|a|an|of|any))*\s+"
)

# Absence and field of view -------------------------------------------------------------------

RESECTION_RE = re.compile(r"ectom(?:y|ies)\b")
PARTIAL_RE = re.compile(
    _words(
        r"partial(?:ly)?",
        r"hemi\w*",
        r"sub-?total",
        r"segmental",
        r"distal",
        r"wedge",
        r"lobectom(?:y|ies)",
        r"segmentectom(?:y|ies)",
    )
)
DEFINITE_ABSENCE_RE = re.compile(
    _words(
        r"surgically\s+(?:absent|removed|resected|excised)",
        r"(?:has|have)\s+been\s+(?:removed|resected|excised)",
        r"removed",
        r"resected",
        r"excised",
        r"explanted",
        r"congenital(?:ly)?\s+(?:absent|absence|missing)",
        r"agenesis",
        r"aplasia",
        r"aplastic",
        r"post-?(?:surgical|operative)\s+absence",
        r"resection\s+of",
        r"empty\s+(?:\w+\s+)?fossa",
        r"fossa\s+is\s+empty",
    )
)
OUT_OF_VIEW_RE = re.compile(
    _words(
        r"(?:not|only\s+partially|partially|partly|incompletely)\s+(?:fully\s+|completely\s+|entirely\s+|wholly\s+)?"
        r"(?:imaged|included|covered|scanned|captured|evaluated|assessed|evaluable)",
        r"not\s+(?:fully|completely|entirely|wholly)\s+(?:seen|visuali[sz]ed|depicted)",
        r"(?:partially|partly|incompletely)\s+(?:seen|visuali[sz]ed|depicted)",
        r"(?:outside|beyond|out\s+of|excluded\s+from|not\s+(?:fully\s+)?(?:in|within)|above|below)\s+(?:of\s+)?(?:the\s+)?"
        r"(?:field[\s-]+of[\s-]+view|fov|scan(?:ned)?(?:\s+(?:range|field|region|volume|area))?"
        r"|imag(?:ed|ing)\s+(?:field|volume|region|area|range))",
        r"(?:field[\s-]+of[\s-]+view|fov|scan(?:\s+range)?)\s+(?:excludes|does\s+not\s+(?:include|cover))",
        r"cut\s+off",
        r"truncated",
    )
)

# What the scan covers -------------------------------------------------------------------------

# A report with these words describes a chest CT: its catch-all sentences cover chest organs only,
# unless it also names an abdominal scan (ABDOMEN_SCAN_RE). A chest CT shows the upper abdomen in
# part, so "upper abdominal organs in the sections are normal" marks no abdominal organ present.
CHEST_REPORT_RE = re.compile(
    _words(
        r"mediastin\w*",
        r"trachea\w*",
        r"main\s+bronch\w*",
        r"lung\s+parenchyma\w*",
        r"both\s+lungs",
        r"(?:right|left)\s+lung",
        r"(?:upper|middle)\s+lobes?",
        r"lingula\w*",
        r"thorax",
        r"chest",
        r"hemithorax",
        r"thyroid",
        r"axilla\w*",
        r"emphysem\w*",
        r"bronchiecta\w*",
        r"mosaic",
        r"(?:interlobular\s+)?septal\s+thickening",
        r"peribronchial",
        r"fibrotic\s+sequela\w*",
        r"pneumothorax",
        r"hilar",
    )
)
ABDOMEN_SCAN_RE = re.compile(
    _words(
        r"abdomen\s+and\s+pelvis",
        r"abdomino-?pelvic",
        r"thoraco-?abdominal",
        r"(?:chest|thorax),?\s+(?:and\s+)?abdomen",
        r"abdominal\s+(?:ct|scan|examination|imaging)",
        r"ct\s+(?:of\s+the\s+)?abdomen",
    )
)
# Regions a catch-all sentence restricts itself to ("the remaining abdominal organs").
CATCH_ALL_REGION_RES = {
    "abdomen": re.compile(_words(r"abdom\w*", r"pelvi\w*")),
    "pelvis": re.compile(_words(r"abdom\w*", r"pelvi\w*")),
    "chest": re.compile(_words(r"thora\w*", r"chest", r"mediastin\w*", r"lungs?", r"intrathoracic")),
}

# Catch-all sentences --------------------------------------------------------------------------

_NORMALISH = (
    r"(?:unremarkable|normal|within\s+normal\s+limits|negative|no\s+(?:\w+\s+){0,3}"
    r"(?:abnormalit\w*|findings?|patholog\w*|lesions?|disease))"
)
# About the other organs explicitly: a catch-all even beside an organ ("apart from the renal cyst").
CATCH_ALL_ORGANS_RE = re.compile(
    r"(?:\b(?:remaining|remainder|rest|other|all\s+other)\b.{0,60}?"
    r"\b(?:organs?|viscera|structures|abdomen|abdominal|findings?|examination|exam|study)\b.*?"
    + _NORMALISH
    + ")"
    r"|(?:" + _NORMALISH + r".{0,40}?\b(?:remaining|remainder|rest|other)\b.{0,40}?"
    r"\b(?:organs?|viscera|structures|abdomen)\b)"
)
# Only when the sentence names no organ ("Otherwise unremarkable." vs "The liver is otherwise normal.").
CATCH_ALL_RE = re.compile(
    r"\botherwise\b.*" + _NORMALISH + "|" + _NORMALISH + r".*\botherwise\b"
    r"|\bno\s+(?:other|further|additional)\s+(?:\w+\s+){0,2}"
    r"(?:abnormalit\w*|findings?|patholog\w*|lesions?|disease)"
    r"|\bnothing\s+(?:else|further)\b"
)
