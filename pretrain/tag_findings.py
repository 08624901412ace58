"""The finding and normal cues of the report lexicon (:mod:`mosmos.pretrain.tag_lexicon`).

What a sentence says about an organ: finding words (lesions, lung and bone findings, density, size,
stones, lumen and wall, inflammation), the normal forms of finding words, and normal cues; with
``_words``, the whole-word alternation the whole lexicon builds its patterns with. Every pattern runs
on lower-cased text, one sentence at a time.
"""

from __future__ import annotations

import re


def _words(*alternatives: str) -> str:
    return r"\b(?:" + "|".join(alternatives) + r")\b"


# Findings --------------------------------------------------------------------------------------

FINDING_RE = re.compile(
    _words(
        # double negation of normality
        r"not\s+(?:entirely\s+|completely\s+)?(?:normal|unremarkable)",
        r"abnormal\w*",
        r"anomal\w*",
        r"patholog\w*",
        # focal lesions
        r"lesions?",
        r"mass(?:es)?",
        r"\w*nodul\w*",
        r"cyst(?:s|ic)?",
        r"tumou?r\w*",
        r"neoplas\w*",
        r"malignan\w*",
        r"carcinoma\w*",
        r"cancers?",
        r"metasta\w*",
        r"lymphomas?",
        r"adenomas?",
        r"\w*angiomas?",
        r"lipomas?",
        r"\w*myomas?",
        r"fibroids?",
        r"polyps?",
        r"abscess\w*",
        r"ha?ematomas?",
        r"collections?",
        r"involvement",
        r"implants?",
        r"goit(?:er|re)s?",
        r"\w*adenopath\w*",
        r"space[\s-]+occupying",
        # lungs and pleura
        r"emphysem\w*",
        r"atelecta\w*",
        r"fibroatelecta\w*",
        r"consolidat\w*",
        r"ground[\s-]+glass",
        r"opacit\w*",
        r"bronchiecta\w*",
        r"mosaic",
        r"effusions?",
        r"pneumon\w*",
        r"pneumothora\w*",
        r"bullae?",
        r"bullous",
        r"blebs?",
        r"honeycomb\w*",
        r"tree[\s-]+in[\s-]+bud",
        r"reticula\w*",
        r"crazy[\s-]+paving",
        r"air[\s-]+trapping",
        r"sequela\w*",
        r"fibrotic",
        r"bands?",
        r"granulomas?",
        # bone
        r"lytic",
        r"destructive",
        r"sclerotic",
        r"\w*blastic",
        r"fractur\w*",
        r"degenerat\w*",
        r"osteophyt\w*",
        r"spondylo\w*",
        r"osteopen\w*",
        r"osteopor\w*",
        r"scolio\w*",
        r"kypho\w*",
        r"sternotom\w*",
        r"stents?",
        # density and texture
        r"hypo-?dens\w*",
        r"hyper-?dens\w*",
        r"hypo-?attenuat\w*",
        r"hyper-?attenuat\w*",
        r"hypo-?enhanc\w*",
        r"hyper-?enhanc\w*",
        r"low[\s-]+(?:attenuation|density)",
        r"high[\s-]+(?:attenuation|density)",
        r"heterogene\w*",
        r"inhomogene\w*",
        r"irregular\w*",
        r"steato\w*",
        r"fatty",
        r"infiltrat\w*",
        r"cirrho\w*",
        r"fibros\w*",
        r"calcifi\w*",
        r"scar(?:s|ring|red)?",
        # size
        r"enlarge\w*",
        r"\w+megaly",
        r"prominen\w*",
        r"increased\s+(?:in\s+)?(?:size|diameter|calibre|caliber)",
        r"(?:size|diameter|calibre|caliber)\s+(?:is\s+|was\s+|were\s+)?increased",
        r"elongat\w*",
        r"atroph\w*",
        r"hypoplas\w*",
        r"shrunken",
        r"volume\s+loss",
        r"hypertroph\w*",
        r"hyperplas\w*",
        # stones
        r"calcul\w*",
        r"\w*stones?",
        r"\w*lithiasis",
        r"\w*liths?",
        r"sludge",
        # lumen and wall
        r"aneurysm\w*",
        r"dilat\w*",
        r"ectasi\w*",
        r"ectatic",
        r"tortu\w*",
        r"distended",
        r"disten[st]ion",
        r"thicken\w*",
        r"stenos[ie]s",
        r"stenotic",
        r"strictur\w*",
        r"narrow\w*",
        r"occlu\w*",
        r"obstruct\w*",
        r"thromb\w*",
        r"emboli?\w*",
        r"dissection",
        r"atheroscleros\w*",
        r"atherosclerotic",
        r"atheroma\w*",
        r"plaques?",
        r"varic\w*",
        r"diverticul\w*",
        r"herni\w*",
        r"ulcer\w*",
        r"perforat\w*",
        r"rupture\w*",
        r"laceration\w*",
        r"fistula\w*",
        # inflammation and injury
        r"\w+itis",
        r"inflam\w*",
        r"o?edema\w*",
        r"hydronephros[ie]s",
        r"hydroureter\w*",
        r"pyelectasis",
        r"infarct\w*",
        r"isch(?:a)?emi\w*",
        r"necros[ie]s",
        r"necrotic",
        r"horseshoe",
        r"post-?(?:surgical|operative)\s+changes?",
    )
)
# Normal forms of a finding word ("non-dilated", "unenlarged") are normal, not findings.
NORMAL_FORM_RE = re.compile(
    _words(
        r"non-?(?:dilated|enlarged|distended|obstructed|thickened|obstructive|aneurysmal)",
        r"unenlarged",
        r"not\s+(?:significantly\s+)?(?:dilated|enlarged|distended|thickened)",
    )
)
NORMAL_RE = re.compile(
    _words(
        r"normal(?:ly)?",
        r"normal-sized",
        r"unremarkable",
        r"within\s+normal\s+limits",
        r"wnl",
        r"preserved",
        r"patent",
        r"homogene?ous(?:ly)?",
        r"intact",
        r"clear",
        r"open",
        r"natural",
        r"negative",
        r"age[\s-]appropriate",
    )
)
