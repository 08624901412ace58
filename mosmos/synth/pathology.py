"""Pathology and surgical absence: which findings a case has and how they change its anatomy.

Findings are drawn from their own random stream, independently of the field of view, the
orientation and the spacing, so an abnormality tag can only be learned from the organ itself.
Every finding is made clearly visible: focal lesions differ from their organ by at least 45 HU
(three times the largest noise level) and span several voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mosmos.synth.anatomy import LIVER_ANCHOR, SPLEEN_ANCHOR, Anatomy, Lesion
from mosmos.synth.geometry import Ellipsoid, VTube

#: Abnormal finding codes and the organs they can affect.
FINDING_ORGANS: dict[str, tuple[str, ...]] = {
    "liver_lesion": ("liver",),
    "fatty_liver": ("liver",),
    "hepatomegaly": ("liver",),
    "splenomegaly": ("spleen",),
    "renal_cyst": ("kidney_right", "kidney_left"),
    "pancreatic_atrophy": ("pancreas",),
    "gallstones": ("gallbladder",),
    "aortic_aneurysm": ("aorta",),
}

#: Probability of each finding per organ it can affect (pretraining and segmentation cases).
PREVALENCE: dict[str, float] = {
    "liver_lesion": 0.28,
    "fatty_liver": 0.25,
    "hepatomegaly": 0.22,
    "splenomegaly": 0.28,
    "renal_cyst": 0.28,
    "pancreatic_atrophy": 0.28,
    "gallstones": 0.28,
    "aortic_aneurysm": 0.28,
}

#: Surgical absence: organ -> finding code written to findings.json.
RESECTIONS: dict[str, str] = {
    "spleen": "splenectomy",
    "kidney_right": "nephrectomy",
    "kidney_left": "nephrectomy",
    "gallbladder": "cholecystectomy",
}
RESECTION_RATE = 0.12

# Findings shown as focal lesions; they are only reported when the lesion lies in the scan.
FOCAL = {"liver_lesion", "renal_cyst", "gallstones", "aortic_aneurysm"}


@dataclass
class Conditions:
    """What is wrong with one patient, before asking what the scan shows of it."""

    findings: dict[str, list[str]] = field(default_factory=dict)  # organ -> abnormal finding codes
    absent: set[str] = field(default_factory=set)


def sample_conditions(rng: np.random.Generator, resections: bool) -> Conditions:
    """Draw findings (each independently at its prevalence) and, optionally, resections."""
    cond = Conditions()
    for code, organs in FINDING_ORGANS.items():
        for organ in organs:
            if rng.random() < PREVALENCE[code]:
                cond.findings.setdefault(organ, []).append(code)
    if resections:
        cond.absent = {organ for organ in RESECTIONS if rng.random() < RESECTION_RATE}
        if {"kidney_right", "kidney_left"} <= cond.absent:
            # A patient keeps at least one kidney; drop one of the two at random.
            cond.absent.discard(str(rng.choice(["kidney_right", "kidney_left"])))
    return cond


def _unit_ball(rng: np.random.Generator, r_min: float, r_max: float) -> np.ndarray:
    direction = rng.normal(size=3)
    return direction / np.linalg.norm(direction) * rng.uniform(r_min, r_max)


def apply_conditions(anat: Anatomy, cond: Conditions, rng: np.random.Generator, spacing: np.ndarray) -> None:
    """Edit ``anat`` in place: enlarge, thin, change density, add lesions and surgical clips.

    ``spacing`` (mm) sets a floor on lesion size so every lesion covers a few voxels.
    """
    in_plane, coarse = float(min(spacing)), float(max(spacing))
    anat.absent = set(cond.absent)
    liver_f = cond.findings.get("liver", [])
    if "hepatomegaly" in liver_f:
        anat.organs["liver"] = [s.scaled(rng.uniform(1.25, 1.35), LIVER_ANCHOR) for s in anat.organs["liver"]]
    if "fatty_liver" in liver_f:
        anat.hu["liver"] = rng.uniform(0, 15)  # below the spleen (45-55 HU), as on real CT
    if "liver_lesion" in liver_f:
        n = int(rng.integers(1, 4))
        fatty = "fatty_liver" in liver_f
        for _ in range(n):
            lobe = 0 if rng.random() < 0.7 else 1
            shape = anat.organs["liver"][lobe]
            radius = max(rng.uniform(10, 16), 2.0 * in_plane)
            # In a fatty liver a metastasis is brighter than the parenchyma, otherwise darker.
            contrast = rng.uniform(50, 65) * (1 if fatty else -1)
            anat.lesions.append(
                Lesion(
                    "liver_lesion",
                    "liver",
                    shape.point(_unit_ball(rng, 0.0, 0.45)),
                    radius,
                    anat.hu["liver"] + contrast,
                    {"lobe": "right" if lobe == 0 else "left", "size_cm": round(2 * radius / 10, 1)},
                )
            )
    if "splenomegaly" in cond.findings.get("spleen", []):
        anat.organs["spleen"] = [
            s.scaled(rng.uniform(1.4, 1.6), SPLEEN_ANCHOR) for s in anat.organs["spleen"]
        ]
    for kidney in ("kidney_right", "kidney_left"):
        if "renal_cyst" in cond.findings.get(kidney, []):
            shape = anat.organs[kidney][0]
            u = _unit_ball(rng, 0.3, 0.75)
            radius = max(rng.uniform(9, 15), 1.5 * in_plane)
            pole = "upper pole" if u[2] > 0.33 else "lower pole" if u[2] < -0.33 else "interpolar region"
            info = {"size_cm": round(2 * radius / 10, 1), "pole": pole}
            anat.lesions.append(
                Lesion("renal_cyst", kidney, shape.point(u), radius, rng.uniform(0, 10), info)
            )
    if "pancreatic_atrophy" in cond.findings.get("pancreas", []):
        anat.organs["pancreas"] = [
            t.thinned(rng.uniform(0.45, 0.55), 0.6 * in_plane) for t in anat.organs["pancreas"]
        ]
        anat.hu["pancreas"] -= rng.uniform(10, 20)  # fatty replacement accompanies atrophy
    if "gallstones" in cond.findings.get("gallbladder", []):
        _add_gallstones(anat, rng, coarse)
    if "aortic_aneurysm" in cond.findings.get("aorta", []):
        _add_aneurysm(anat, rng)
    if "gallbladder" in cond.absent:
        gb = anat.organs["gallbladder"][0]
        anat.clips.append((gb.point(np.array([0.0, 0.0, 0.8])), 0.7 * coarse))


def _add_gallstones(anat: Anatomy, rng: np.random.Generator, coarse: float) -> None:
    gb: Ellipsoid = anat.organs["gallbladder"][0]
    n = int(rng.integers(1, 4))
    for _ in range(n):
        radius = min(max(rng.uniform(5, 8), 0.75 * coarse), 0.8 * float(gb.semi.min()))
        room = np.maximum(gb.semi - radius, 1.0) / gb.semi
        # Stones settle in the dependent (posterior, fundal) part of the lumen.
        u = _unit_ball(rng, 0.0, 0.6) * room + np.array([0.0, -0.25, -0.3]) * room
        info = {"size_cm": round(2 * radius / 10, 1)}
        anat.lesions.append(
            Lesion("gallstones", "gallbladder", gb.point(u), radius, rng.uniform(400, 800), info)
        )


def _add_aneurysm(anat: Anatomy, rng: np.random.Generator) -> None:
    tube: VTube = anat.organs["aorta"][0]
    zc, half, factor = rng.uniform(-45, -10), rng.uniform(22, 32), rng.uniform(1.9, 2.3)
    w = np.where(np.abs(tube.z - zc) < half, np.cos(np.pi / 2 * (tube.z - zc) / half) ** 2, 0.0)
    radii = tube.radii * (1 + (factor - 1) * w)
    # The spine is behind the aorta, so an aneurysm bulges forward.
    y = tube.y + 0.7 * (radii - tube.radii)
    anat.organs["aorta"] = [tube.with_profile(y, radii)]
    k = int(np.argmin(np.abs(tube.z - zc)))
    center = np.array([tube.x[k], y[k], tube.z[k]])
    info = {"size_cm": round(2 * float(radii[k]) / 10, 1)}
    anat.lesions.append(Lesion("aortic_aneurysm", "aorta", center, 0.8 * half, None, info))
