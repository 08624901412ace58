"""Phrase tables of the synthetic report writer: how reports name, describe and summarise organs.

Each table holds interchangeable phrasings of one statement; :mod:`mosmos.synth.reports` draws
from them with the case's random generator. Every phrasing follows the writing rules of that
module's docstring, so the report tags stay exactly recoverable by the sentence-level parser.
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


def cap(text: str) -> str:
    """First letter upper-cased (a phrase that opens a sentence)."""
    return text[0].upper() + text[1:]


def pick(rng: np.random.Generator, options: list[str]) -> str:
    """One phrasing, drawn uniformly with one ``rng.integers`` call (the draw order fixes the bytes)."""
    return options[int(rng.integers(len(options)))]


def side_of(organ: str) -> str:
    """``"right"`` for ``kidney_right``, else ``"left"`` (only kidneys are sided here)."""
    return "right" if organ == "kidney_right" else "left"


def abnormal_sentences(organ: str, finding: str, info: dict, rng: np.random.Generator) -> tuple[str, str]:
    """(findings sentence, impression sentence) for one abnormal finding of one organ."""
    n, size, s = info.get("n", 1), info.get("size_cm", 1.0), "s" if info.get("n", 1) > 1 else ""
    side = side_of(organ) if organ.startswith("kidney") else ""
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
    return cap(pick(rng, text)), cap(pick(rng, imp))
