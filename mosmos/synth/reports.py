"""Radiology reports written from a case's ground truth, and the organ tags they imply.

Reports vary the way real ones do: three styles (every organ described; only what matters plus a
catch-all "remaining organs are unremarkable"; only what matters with no catch-all), free-text or
structured ("Liver: ..."), several phrasings per statement, vocabulary synonyms (hepatic, splenic,
renal, gall bladder, biliary, IVC) and negations ("No focal hepatic lesion."). They are written so
the tag contract of :func:`findings_to_tags` is exactly recoverable by a sentence-level parser:

* each sentence names one organ, or coordinates organs that are all normal;
* out-of-view sentences say "not included in / outside the field of view" or "not imaged";
* absence sentences say "absent", "not seen", "removed" or "status post ...ectomy";
* abnormal sentences carry no negation word; normal ones mention a finding only negated;
* the catch-all ("remaining", "otherwise", "other") appears only when every organ it covers is
  normal, and no other sentence uses those words.
"""

from __future__ import annotations

import numpy as np

# How reports name each organ: noun phrase (a vocabulary synonym) and structured-report heading.
NAMES: dict[str, tuple[str, str]] = {
    "liver": ("liver", "Liver"),
    "spleen": ("spleen", "Spleen"),
    "kidney_right": ("right kidney", "Right kidney"),
    "kidney_left": ("left kidney", "Left kidney"),
    "pancreas": ("pancreas", "Pancreas"),
    "stomach": ("stomach", "Stomach"),
    "gallbladder": ("gallbladder", "Gallbladder"),
    "aorta": ("abdominal aorta", "Aorta"),
    "duodenum": ("duodenum", "Duodenum"),
    "inferior_vena_cava": ("inferior vena cava", "Inferior vena cava"),
    "urinary_bladder": ("urinary bladder", "Urinary bladder"),
}

NORMAL: dict[str, list[str]] = {
    "liver": [
        "The liver is normal in size and attenuation without focal lesion.",
        "No focal hepatic lesion.",
        "The liver is unremarkable.",
        "Normal hepatic size and attenuation.",
    ],
    "spleen": [
        "The spleen is normal in size without focal abnormality.",
        "The spleen is unremarkable.",
        "Normal splenic size.",
        "No splenomegaly.",
    ],
    "kidney": [
        "There is no evidence of hydronephrosis or mass in the {side} kidney.",
        "The {side} kidney enhances normally without hydronephrosis.",
        "The {side} kidney is unremarkable.",
        "Normal {side} kidney.",
    ],
    "pancreas": [
        "The pancreas is unremarkable without ductal dilatation.",
        "The pancreas is normal in size and attenuation.",
        "No pancreatic abnormality.",
        "Normal pancreatic parenchyma.",
    ],
    "stomach": [
        "The stomach is unremarkable.",
        "The stomach is normal in appearance.",
        "No gastric wall thickening.",
        "The stomach is unremarkable without wall thickening or mass.",
        "No gastric mass.",
    ],
    "gallbladder": [
        "The gallbladder is unremarkable.",
        "The gallbladder is normal without stones.",
        "No radiopaque stones in the gall bladder.",
        "Normal gallbladder; no biliary dilatation.",
    ],
    "aorta": [
        "The abdominal aorta is normal in caliber.",
        "No abdominal aortic aneurysm.",
        "The aorta is of normal calibre.",
    ],
    "duodenum": [
        "The duodenum is unremarkable.",
        "No duodenal abnormality.",
        "The duodenum is normal in appearance.",
        "No duodenal diverticulum or wall thickening.",
        "The duodenum is normal without diverticulum.",
    ],
    "inferior_vena_cava": [
        "The inferior vena cava is patent.",
        "The IVC is unremarkable.",
        "Normal caliber of the inferior vena cava.",
        "The IVC is patent without filling defect.",
        "No thrombus in the inferior vena cava.",
        "The inferior vena cava is patent without thrombus.",
    ],
    "urinary_bladder": [
        "The urinary bladder is unremarkable.",
        "The bladder is normal in appearance.",
        "No bladder wall thickening.",
        "The urinary bladder is unremarkable without calculi.",
        "No bladder stones.",
        "No calculi in the urinary bladder.",
    ],
}
STRUCTURED_NORMAL = ["{head}: unremarkable.", "{head}: normal.", "{head}: normal in size and appearance."]

# Pairs of normal organs that may share one sentence ("The spleen and pancreas are unremarkable.").
PAIRS: dict[tuple[str, str], list[str]] = {
    ("spleen", "pancreas"): [
        "The spleen and pancreas are unremarkable.",
        "The spleen and pancreas are normal.",
    ],
    ("aorta", "inferior_vena_cava"): ["The aorta and inferior vena cava are normal in caliber."],
    ("stomach", "duodenum"): ["The stomach and duodenum are unremarkable."],
    ("kidney_right", "kidney_left"): [
        "The right kidney and the left kidney are unremarkable.",
        "The right kidney and the left kidney enhance symmetrically without hydronephrosis.",
    ],
}

ABSENT: dict[str, list[str]] = {
    "spleen": [
        "Status post splenectomy; the spleen is absent.",
        "The spleen is surgically absent.",
        "The spleen is not seen, consistent with prior splenectomy.",
    ],
    "kidney": [
        "Status post {side} nephrectomy.",
        "{side} nephrectomy.",
        "The {side} kidney is surgically absent.",
        "The {side} kidney has been removed; the {side} renal fossa is empty.",
    ],
    "gallbladder": [
        "Status post cholecystectomy.",
        "Cholecystectomy clips; the gallbladder is not seen.",
        "The gallbladder is surgically absent.",
    ],
}
STRUCTURED_ABSENT = ["{head}: surgically absent.", "{head}: absent, status post {procedure}."]
PROCEDURE = {
    "spleen": "splenectomy",
    "kidney_right": "nephrectomy",
    "kidney_left": "nephrectomy",
    "gallbladder": "cholecystectomy",
}

OUT_OF_VIEW = [
    "The {name} is not included in the field of view.",
    "The {name} is not imaged.",
    "The {name} lies outside the scanned field of view.",
]
LIVER_DOME = "The liver dome is not imaged and the liver is not included in the field of view."
STRUCTURED_OUT_OF_VIEW = ["{head}: not included in the field of view.", "{head}: not imaged."]

CATCH_ALL = [
    "The remaining abdominal organs are unremarkable.",
    "Otherwise unremarkable.",
    "The other abdominal organs are within normal limits.",
    "Remaining solid organs and vessels are unremarkable.",
]
EXTRAS = [
    "No free intraperitoneal fluid.",
    "No lymphadenopathy.",
    "No free air.",
    "No abdominal wall hernia.",
]
NO_ACUTE = [
    "No acute abdominal abnormality.",
    "No acute intra-abdominal process.",
    "No acute findings in the abdomen.",
]
STYLES = {"complete": 0.4, "focused": 0.35, "terse": 0.25}

COUNT = {1: "a single", 2: "two", 3: "three"}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _side(organ: str) -> str:
    return "right" if organ == "kidney_right" else "left"


def _abnormal(organ: str, finding: str, info: dict, rng: np.random.Generator) -> tuple[str, str]:
    """(findings sentence, impression sentence) for one abnormal finding of one organ."""
    n, size, s = info.get("n", 1), info.get("size_cm", 1.0), "s" if info.get("n", 1) > 1 else ""
    side = _side(organ) if organ.startswith("kidney") else ""
    if finding == "liver_lesion":
        adj = "relatively hyperattenuating" if info.get("fatty") else "hypodense"
        lobe = info.get("lobe", "right hepatic lobe")
        if n == 1:
            text = [
                f"A {size} cm {adj} lesion is seen in the {lobe}.",
                f"Solitary {adj} liver lesion of {size} cm in the {lobe}.",
            ]
        else:
            text = [
                f"{COUNT[n]} {adj} lesions in the liver, the largest measuring {size} cm in the {lobe}.",
                f"There are {n} focal {adj} hepatic lesions, up to {size} cm.",
                f"Multiple ({n}) {adj} liver lesions, the largest {size} cm.",
            ]
        imp = [
            f"{COUNT[n]} focal hepatic lesion{s}, largest {size} cm.",
            f"Hepatic lesion{s} up to {size} cm, indeterminate.",
        ]
    elif finding == "fatty_liver":
        text = [
            "The liver is diffusely hypoattenuating, consistent with hepatic steatosis.",
            "Diffuse fatty infiltration of the liver.",
            "Decreased attenuation of the hepatic parenchyma in keeping with steatosis.",
        ]
        imp = ["Hepatic steatosis.", "Fatty liver.", "Diffuse fatty infiltration of the liver."]
    elif finding == "hepatomegaly":
        text = [
            "Hepatomegaly is present.",
            "The liver is enlarged.",
            "Enlarged liver extending into the lower abdomen.",
        ]
        imp = ["Hepatomegaly.", "Enlarged liver."]
    elif finding == "splenomegaly":
        text = [
            f"Splenomegaly, with the spleen measuring {size} cm.",
            f"The spleen is enlarged, measuring {size} cm in length.",
            f"Enlarged spleen ({size} cm).",
        ]
        imp = ["Splenomegaly.", f"Enlarged spleen ({size} cm)."]
    elif finding == "renal_cyst":
        text = [
            f"A {size} cm simple cyst is seen in the {info.get('pole', 'interpolar region')} of the {side} kidney.",
            f"{side} renal cyst measuring {size} cm.",
            f"There is a water-density cyst of {size} cm in the {side} kidney.",
        ]
        imp = [
            f"Simple {side} renal cyst.",
            f"{side} renal cyst, likely benign.",
            f"Cyst in the {side} kidney.",
        ]
    elif finding == "pancreatic_atrophy":
        text = [
            "The pancreas is diffusely atrophic.",
            "Pancreatic atrophy with thinning of the parenchyma.",
            "Marked atrophy of the pancreatic gland.",
        ]
        imp = ["Pancreatic atrophy.", "Atrophic pancreas."]
    elif finding == "gallstones":
        first = f"A {size} cm dense gallstone" if n == 1 else f"{COUNT[n]} dense gallstones"
        text = [
            f"Cholelithiasis with {COUNT[n]} calcified stone{s} up to {size} cm.",
            f"{first} within the gallbladder.",
            f"The gall bladder contains {COUNT[n]} calcified stone{s}.",
        ]
        imp = ["Cholelithiasis.", "Gallstones in the gallbladder.", f"Cholelithiasis, {COUNT[n]} stone{s}."]
    elif finding == "aortic_aneurysm":
        text = [
            f"Abdominal aortic aneurysm with a maximal diameter of {size} cm.",
            f"The abdominal aorta is aneurysmal, measuring {size} cm.",
            f"Focal aneurysmal dilatation of the aorta to {size} cm.",
        ]
        imp = [
            f"Abdominal aortic aneurysm measuring {size} cm.",
            f"Aortic aneurysm ({size} cm); vascular referral suggested.",
        ]
    elif finding == "gastric_wall_thickening":
        text = [
            f"Focal gastric wall thickening measuring {size} cm.",
            f"There is a {size} cm soft-tissue mass arising from the gastric wall.",
            f"The stomach shows focal wall thickening up to {size} cm.",
            f"Polypoid gastric mass of {size} cm in the fundus.",
        ]
        imp = [
            "Focal gastric wall thickening; endoscopic correlation recommended.",
            f"Gastric mass, {size} cm.",
            "Gastric wall thickening, suspicious for neoplasm.",
        ]
    elif finding == "duodenal_diverticulum":
        text = [
            f"A {size} cm gas-filled duodenal diverticulum.",
            f"There is a {size} cm diverticulum arising from the duodenum.",
            f"Gas-containing outpouching of the duodenum, consistent with a diverticulum of {size} cm.",
        ]
        imp = [
            "Duodenal diverticulum.",
            f"Duodenal diverticulum, {size} cm.",
            "Incidental duodenal diverticulum.",
        ]
    elif finding == "ivc_thrombus":
        text = [
            f"A low-attenuation filling defect in the inferior vena cava over {size} cm, consistent with thrombus.",
            f"Thrombus in the IVC extending over {size} cm.",
            f"The inferior vena cava contains a {size} cm hypodense thrombus.",
        ]
        imp = [
            "IVC thrombus.",
            "Thrombosis of the inferior vena cava.",
            f"Inferior vena cava thrombus ({size} cm).",
        ]
    elif finding == "bladder_stone":
        one = n == 1
        text = [
            f"A {size} cm calculus in the urinary bladder."
            if one
            else f"{COUNT[n]} calculi in the urinary bladder, up to {size} cm.",
            f"Bladder stone{s} {'of' if one else 'up to'} {size} cm.",
            f"The urinary bladder contains {COUNT[n]} dense calcul{'us' if one else 'i'}.",
        ]
        imp = [
            f"Bladder calcul{'us' if one else 'i'}.",
            f"Urinary bladder stone{s}.",
            f"Vesical calcul{'us' if one else 'i'}, {'' if one else 'up to '}{size} cm.",
        ]
    else:
        raise ValueError(f"no report template for finding {finding!r}")
    return _cap(_pick(rng, text)), _cap(_pick(rng, imp))


def _finding_info(record: dict) -> dict[tuple[str, str], dict]:
    """Size, count and location of each (organ, finding) for the report text."""
    info: dict[tuple[str, str], dict] = {}
    fatty = "fatty_liver" in record["organs"].get("liver", {}).get("findings", [])
    for les in record.get("lesions", []):
        entry = info.setdefault((les["organ"], les["finding"]), {"n": 0, "size_cm": 0.0})
        entry["n"] += 1
        if les.get("size_cm", 0.0) >= entry["size_cm"]:
            entry["size_cm"] = les.get("size_cm", 0.0)
            if "lobe" in les:
                entry["lobe"] = f"{les['lobe']} hepatic lobe"
            if "pole" in les:
                entry["pole"] = les["pole"]
        if les["finding"] == "liver_lesion":
            entry["fatty"] = fatty
            entry["n"] = min(entry["n"], 3)
    for organ, details in record.get("details", {}).items():
        for finding, values in details.items():
            info.setdefault((organ, finding), {}).update(values)
    return info


def _organ_sentences(
    organ: str, entry: dict, info: dict, structured: bool, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """Findings sentences and impression sentences for one organ."""
    name, head = NAMES[organ]
    status, fmt = entry["status"], {"side": _side(organ), "name": name, "head": head}
    kind = "kidney" if organ.startswith("kidney") else organ
    if status == "out_of_view":
        if structured:
            return [_pick(rng, STRUCTURED_OUT_OF_VIEW).format(**fmt)], []
        options = [*OUT_OF_VIEW, LIVER_DOME] if organ == "liver" else OUT_OF_VIEW
        return [_cap(_pick(rng, options).format(**fmt))], []
    if status == "absent":
        impression = [_cap(_pick(rng, ABSENT[kind]).format(**fmt))] if rng.random() < 0.4 else []
        if structured:
            return [_pick(rng, STRUCTURED_ABSENT).format(procedure=PROCEDURE[organ], **fmt)], impression
        return [_cap(_pick(rng, ABSENT[kind]).format(**fmt))], impression
    if status == "normal":
        if structured:
            return [_pick(rng, STRUCTURED_NORMAL).format(**fmt)], []
        return [_cap(_pick(rng, NORMAL[kind]).format(**fmt))], []
    text, impression = [], []
    for finding in entry["findings"]:
        sentence, imp = _abnormal(organ, finding, info.get((organ, finding), {}), rng)
        text.append(sentence)
        impression.append(imp)
    if structured:
        text[0] = f"{head}: {text[0]}"
    return text, impression


def write_report(record: dict, rng: np.random.Generator) -> tuple[str, str, dict]:
    """Findings and impression text for a case, and what the report mentions.

    Returns ``(findings_en, impressions_en, meta)`` with ``meta = {"style", "structured",
    "catch_all", "mentioned"}``; ``meta`` is what :func:`findings_to_tags` needs.
    """
    organs = {o: e for o, e in record["organs"].items() if o in NAMES}
    styles = list(STYLES)
    style = str(rng.choice(styles, p=[STYLES[s] for s in styles]))
    structured = style == "complete" and rng.random() < 0.3
    # Brief styles still name every organ that is not normal; of the normal ones, only some.
    mentioned = [
        o for o in organs if organs[o]["status"] != "normal" or style == "complete" or rng.random() < 0.25
    ]
    if style == "complete" and not structured and rng.random() < 0.5:  # structured keeps its order
        mentioned = [mentioned[i] for i in rng.permutation(len(mentioned))]
    info = _finding_info(record)
    blocks: list[list[str]] = []
    impression: list[str] = []
    done: set[str] = set()
    for organ in mentioned:
        if organ in done:
            continue
        pair = next(
            (p for p in PAIRS if organ in p and all(organs.get(o, {}).get("status") == "normal" for o in p)),
            None,
        )
        if (
            pair
            and not structured
            and all(o in mentioned and o not in done for o in pair)
            and rng.random() < 0.35
        ):
            blocks.append([_pick(rng, PAIRS[pair])])
            done.update(pair)
            continue
        text, imp = _organ_sentences(organ, organs[organ], info, structured, rng)
        blocks.append(text)
        impression.extend(imp)
        done.add(organ)
    for extra in rng.permutation(len(EXTRAS))[: int(rng.integers(0, 3))]:
        blocks.insert(int(rng.integers(len(blocks) + 1)), [EXTRAS[int(extra)]])
    catch_all = style == "focused"
    if catch_all:
        blocks.append([_pick(rng, CATCH_ALL)])
    if not blocks:
        blocks.append([_pick(rng, EXTRAS)])
    findings_text = " ".join(s for block in blocks for s in block)
    if impression:
        order = rng.permutation(len(impression))
        impression_text = " ".join(impression[i] for i in order)
    else:
        impression_text = _pick(rng, NO_ACUTE)
    meta = {"style": style, "structured": structured, "catch_all": catch_all, "mentioned": sorted(done)}
    return findings_text, impression_text, meta


def findings_to_tags(case: dict) -> dict[str, tuple[int, int]]:
    """Expected report tags ``organ -> (present, abnormal)`` for one ``findings.json`` entry.

    ``present`` and ``abnormal`` are 1, 0 or -1 (unknown): out of view (-1, -1); absent (0, -1);
    normal (1, 0); abnormal (1, 1). An organ the report does not mention is (1, 0) when the
    report has a catch-all sentence and (-1, -1) otherwise. A case without a ``report`` entry
    (segmentation cases) is treated as a report that mentions every organ.
    """
    report = case.get("report")
    mentioned = set(report["mentioned"]) if report else None
    catch_all = bool(report and report.get("catch_all"))
    tags: dict[str, tuple[int, int]] = {}
    for organ, entry in case["organs"].items():
        status = entry["status"]
        if mentioned is not None and organ not in mentioned:
            tags[organ] = (1, 0) if catch_all else (-1, -1)
        elif status == "out_of_view":
            tags[organ] = (-1, -1)
        elif status == "absent":
            tags[organ] = (0, -1)
        elif status == "abnormal":
            tags[organ] = (1, 1)
        else:
            tags[organ] = (1, 0)
    return tags
