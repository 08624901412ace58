"""Pathology and surgical absence: which findings a case has and how they change its anatomy.

Findings are drawn from their own random stream, independently of the field of view, the
orientation and the spacing, so an abnormality tag can only be learned from the organ itself.
Every finding is made clearly visible: focal lesions differ from their organ by at least 45 HU
(three times the largest noise level) and span several voxels. Every organ has a finding, so no
organ's abnormality tag is constant: the hollow organs and the IVC get a gastric mass, a gas-filled
duodenal diverticulum, a caval thrombus and bladder stones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mosmos.synth.anatomy import LIVER_ANCHOR, PRIORITY, SPLEEN_ANCHOR, Anatomy, Lesion
from mosmos.synth.geometry import Ellipsoid, Tube, VTube

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
    "gastric_wall_thickening": ("stomach",),
    "duodenal_diverticulum": ("duodenum",),
    "ivc_thrombus": ("inferior_vena_cava",),
    "bladder_stone": ("urinary_bladder",),
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
    "gastric_wall_thickening": 0.28,
    "duodenal_diverticulum": 0.28,
    "ivc_thrombus": 0.28,
    "bladder_stone": 0.28,
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
FOCAL = {
    "liver_lesion",
    "renal_cyst",
    "gallstones",
    "aortic_aneurysm",
    "gastric_wall_thickening",
    "duodenal_diverticulum",
    "ivc_thrombus",
    "bladder_stone",
}


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
        _add_stones(anat, rng, "gallstones", "gallbladder", (5, 8), 0.75 * coarse, 0.8, (0.0, -0.25, -0.3))
    if "aortic_aneurysm" in cond.findings.get("aorta", []):
        _add_aneurysm(anat, rng)
    if "gastric_wall_thickening" in cond.findings.get("stomach", []):
        _add_gastric_mass(anat, rng, in_plane)
    if "duodenal_diverticulum" in cond.findings.get("duodenum", []):
        _add_diverticulum(anat, rng, in_plane)
    if "ivc_thrombus" in cond.findings.get("inferior_vena_cava", []):
        _add_thrombus(anat, rng, coarse)
    if "bladder_stone" in cond.findings.get("urinary_bladder", []):
        # Bladder stones lie on the dependent (posterior) wall of a supine patient.
        _add_stones(
            anat, rng, "bladder_stone", "urinary_bladder", (8, 12), 0.8 * coarse, 0.5, (0.0, -0.35, -0.1)
        )
    if "gallbladder" in cond.absent:
        gb = anat.organs["gallbladder"][0]
        anat.clips.append((gb.point(np.array([0.0, 0.0, 0.8])), 0.7 * coarse))


def _add_stones(
    anat: Anatomy,
    rng: np.random.Generator,
    kind: str,
    organ: str,
    radius_mm: tuple[float, float],
    min_radius: float,
    max_fill: float,
    dependent: tuple[float, float, float],
) -> None:
    """One to three dense stones in the lumen of a fluid-filled ellipsoid, settled toward ``dependent``.

    The radius is drawn from ``radius_mm``, floored at ``min_radius`` (so a stone covers voxels at
    coarse spacing) and capped at ``max_fill`` of the organ's smallest semi-axis.
    """
    sac: Ellipsoid = anat.organs[organ][0]
    n = int(rng.integers(1, 4))
    for _ in range(n):
        radius = min(max(rng.uniform(*radius_mm), min_radius), max_fill * float(sac.semi.min()))
        room = np.maximum(sac.semi - radius, 1.0) / sac.semi
        u = _unit_ball(rng, 0.0, 0.6) * room + np.array(dependent) * room
        info = {"size_cm": round(2 * radius / 10, 1)}
        anat.lesions.append(
            Lesion(kind, organ, sac.point(u), radius, rng.uniform(400, 800), info, intraluminal=True)
        )


# Probe points of a ball, in radii: its centre and six points on its axes, well inside.
_PROBES = np.vstack([np.zeros(3), np.eye(3), -np.eye(3)]) * 0.7
CANDIDATES = 4  # placements drawn per wall lesion; the least hidden one is kept


def _least_hidden(anat: Anatomy, organ: str, centers: list[np.ndarray], radius: float) -> np.ndarray:
    """The candidate centre whose ball the organs ahead of ``organ`` in the labels cover least.

    A wall lesion can grow its organ's label only where no higher-priority organ is (an enlarged
    spleen swallows much of the fundus), so of a few random placements the most visible one wins.
    """
    ahead = [o for o in PRIORITY[: PRIORITY.index(organ)] if o not in anat.absent]

    def hidden(center: np.ndarray) -> int:
        pts = center + radius * _PROBES
        q = (pts[:, 0], pts[:, 1], pts[:, 2])
        covered = np.zeros(len(pts), dtype=bool)
        for other in ahead:
            for shape in anat.organs[other]:
                covered |= shape.inside(q)
        return int(covered.sum())

    return min(centers, key=hidden)


def _add_gastric_mass(anat: Anatomy, rng: np.random.Generator, in_plane: float) -> None:
    """Focal wall thickening: a soft-tissue mass on the fundal wall, filling part of the lumen.

    It enhances 50-62 HU above the gastric fluid it displaces (and far above the gas), so it stands
    out from the lumen whatever the noise; the part bulging outward stays in the stomach label.
    """
    fundus: Ellipsoid = anat.organs["stomach"][0]
    radius = max(rng.uniform(13, 18), 2.0 * in_plane)
    centers = []
    for _ in range(CANDIDATES):
        # Mostly toward the anterior and medial wall, away from the spleen and left kidney.
        v = rng.normal(size=3) + np.array([1.0, 1.5, 0.0])
        centers.append(fundus.point(v / np.linalg.norm(v) * rng.uniform(0.55, 0.7)))
    center = _least_hidden(anat, "stomach", centers, radius)
    hu = anat.hu["gastric_fluid"] + rng.uniform(50, 62)
    info = {"size_cm": round(2 * radius / 10, 1)}
    anat.lesions.append(Lesion("gastric_wall_thickening", "stomach", center, radius, hu, info))


def _add_diverticulum(anat: Anatomy, rng: np.random.Generator, in_plane: float) -> None:
    """A gas-filled outpouching of the second or third part of the duodenum.

    It points mostly forward and down, away from the IVC and right kidney behind the duodenum;
    its centre sits just outside the tube so neck and sac join the lumen.
    """
    tube: Tube = anat.organs["duodenum"][0]
    radius = max(rng.uniform(12, 16), 1.6 * in_plane)
    centers = []
    for _ in range(CANDIDATES):
        k = int(rng.integers(3, 5))  # segments from the descending part round to the horizontal part
        a, b = tube.points[k], tube.points[k + 1]
        t = rng.uniform(0.2, 0.8)
        r_tube = float(tube.radii[k] + t * (tube.radii[k + 1] - tube.radii[k]))
        axis = (b - a) / np.linalg.norm(b - a)
        v = rng.normal(size=3) + np.array([0.0, 1.5, -0.5])
        v -= v.dot(axis) * axis
        centers.append(a + t * (b - a) + v / np.linalg.norm(v) * (r_tube + 0.35 * radius))
    center = _least_hidden(anat, "duodenum", centers, radius)
    info = {"size_cm": round(2 * radius / 10, 1)}
    anat.lesions.append(
        Lesion("duodenal_diverticulum", "duodenum", center, radius, rng.uniform(-850, -650), info)
    )


def _add_thrombus(anat: Anatomy, rng: np.random.Generator, coarse: float) -> None:
    """A bland thrombus: a 20-40 HU filling defect in the contrast-filled IVC over several slices."""
    tube: VTube = anat.organs["inferior_vena_cava"][0]
    zc = rng.uniform(-55, 5)  # the infrarenal and renal segments
    half = max(rng.uniform(18, 28), 2.5 * coarse)
    radius = 0.75 * float(np.interp(zc, tube.z, tube.radii))
    center = np.array([np.interp(zc, tube.z, tube.x), np.interp(zc, tube.z, tube.y), zc])
    info = {"size_cm": round(2 * half / 10, 1)}
    semi = np.array([radius, radius, half])
    hu = rng.uniform(20, 40)
    anat.lesions.append(
        Lesion("ivc_thrombus", "inferior_vena_cava", center, radius, hu, info, semi=semi, intraluminal=True)
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
