"""One synthetic CT case: scanner geometry, rasterisation, field of view, noise and ground truth.

A case draws from five independent random streams (geometry, anatomy, pathology, noise, report)
spawned from ``(seed, split, index)``, so it is reproducible on its own, in any order or process,
and its findings are statistically independent of its orientation, spacing and field of view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mosmos.synth.anatomy import PHANTOM_ORGANS, Anatomy, Rendered, render, sample_anatomy
from mosmos.synth.geometry import Coords, Grid, Sampler, Waves, reorient, rotation
from mosmos.synth.pathology import FOCAL, RESECTIONS, Conditions, apply_conditions, sample_conditions
from mosmos.synth.reports import write_report

# Craniocaudal extent of the modelled abdomen (liver dome to bladder floor), anatomical mm.
ABDOMEN_Z = (-142.0, 125.0)
# A box holding every labelled organ with margin, for measuring what lies outside the scan.
ORGAN_BOX = (np.array([-135.0, -115.0, -150.0]), np.array([135.0, 115.0, 140.0]))
OUT_OF_VIEW_BELOW = 0.3  # an organ with less of its volume inside the scan is "out_of_view"
ORIENTATION_P = {"RAS": 0.35, "LPS": 0.35, "LPI": 0.15, "RAI": 0.15}
FOV_CUT_P = {"top": 0.15, "bottom": 0.15}
MAX_SPACING = 10.0
MAX_IN_PLANE = 9.0  # pixels stay finer than slices even when a tiny grid hits the spacing cap


@dataclass(frozen=True)
class CaseSpec:
    """What to generate: identity, random stream and the options of the split it belongs to."""

    case_id: str
    stream: tuple[int, int, int]  # (seed, split code, index)
    shape: tuple[int, int, int]
    resections: bool = False
    fov_cuts: bool = False
    noise: tuple[float, float] = (8.0, 13.0)
    report: bool = False


@dataclass
class Case:
    """A generated case in its stored orientation, with its ground-truth record."""

    image: np.ndarray  # int16 HU
    labels: np.ndarray  # uint8, 1 + index in PHANTOM_ORGANS
    affine: np.ndarray
    record: dict
    report: tuple[str, str] | None = None  # (Findings_EN, Impressions_EN)


def _geometry(rng: np.random.Generator, spec: CaseSpec, half_width: np.ndarray) -> dict:
    """Patient pose in the scanner and the scan's voxel grid (spacing, field of view, orientation)."""
    scale = rng.uniform(0.93, 1.07) * rng.uniform(0.98, 1.02, size=3)
    rot = rotation(rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-5, 5))
    shift = rng.uniform([-12, -12, -15], [12, 12, 15])
    nx, ny, nz = spec.shape
    # The in-plane field of view is fitted to the body, as a technologist does; slices to the abdomen.
    fit = max(2 * half_width[0] * scale[0] / nx, 2 * half_width[1] * scale[1] / ny)
    sxy = float(np.clip(fit * rng.uniform(1.05, 1.25), 0.3, MAX_IN_PLANE))
    lo, hi = (z * scale[2] for z in ABDOMEN_Z)
    sz = float(np.clip((hi - lo) * rng.uniform(1.02, 1.10) / nz, 0.3, MAX_SPACING))
    center = np.array(
        [shift[0] + rng.uniform(-10, 10), shift[1] + rng.uniform(-10, 10), shift[2] + (lo + hi) / 2]
    )
    cut, u = "none", rng.random()
    if spec.fov_cuts and u < FOV_CUT_P["top"]:
        cut, center[2] = "top", center[2] - rng.uniform(45, 110)
    elif spec.fov_cuts and u < FOV_CUT_P["top"] + FOV_CUT_P["bottom"]:
        cut, center[2] = "bottom", center[2] + rng.uniform(50, 110)
    else:
        center[2] += rng.uniform(-8, 8)
    spacing = np.array([sxy, sxy, sz])
    origin = center - spacing * (np.asarray(spec.shape) - 1) / 2
    corners = np.array(np.meshgrid(*zip(*ORGAN_BOX, strict=True), indexing="ij")).reshape(3, -1)
    world = rot @ (corners * scale[:, None]) + shift[:, None]
    grid = Grid.covering(origin, spacing, spec.shape, world.min(axis=1) - 10, world.max(axis=1) + 10)
    codes = list(ORIENTATION_P)
    code = str(rng.choice(codes, p=[ORIENTATION_P[c] for c in codes]))
    warp = [Waves.sample(rng, 3, (120.0, 300.0), 5.0) for _ in range(3)]
    return {"scale": scale, "rot": rot, "shift": shift, "grid": grid, "cut": cut, "code": code, "warp": warp}


def _sampler(geo: dict) -> Sampler:
    """Anatomical coordinates of the padded grid: undo the patient's pose, then a smooth warp."""
    grid: Grid = geo["grid"]
    rot, scale, shift = geo["rot"], geo["scale"], geo["shift"]
    world = grid.world()
    r, sh, inv = rot.tolist(), shift.tolist(), (1.0 / scale).tolist()
    d = [world[i] - sh[i] for i in range(3)]
    a = [(d[0] * r[0][k] + d[1] * r[1][k] + d[2] * r[2][k]) * inv[k] for k in range(3)]
    q = tuple(a[k] + geo["warp"][k](a).astype(np.float32) for k in range(3))
    m = np.diag(1.0 / grid.spacing) @ rot @ np.diag(scale)
    b = (shift - grid.padded_origin) / grid.spacing
    return Sampler(q, m, b, margin=max(w.bound for w in geo["warp"]) + 1.0)


def make_case(spec: CaseSpec) -> Case:
    """Generate one case: image, organ labels, affine and the ground-truth record."""
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(list(spec.stream)).spawn(5)]
    g_geo, g_anat, g_path, g_noise, g_report = streams
    anat = sample_anatomy(g_anat)
    half_width = anat.cavity_semi + anat.muscle + anat.fat
    geo = _geometry(g_geo, spec, half_width)
    grid: Grid = geo["grid"]
    cond = sample_conditions(g_path, resections=spec.resections)
    apply_conditions(anat, cond, g_path, grid.spacing)

    smp = _sampler(geo)
    out = render(anat, smp)
    crop = grid.crop
    # How much of each organ (as it would be, even if resected) lies inside the stored scan.
    fraction = {}
    for organ in PHANTOM_ORGANS:
        total = int(out.organ_masks[organ].sum())
        fraction[organ] = float(out.organ_masks[organ][crop].sum()) / total if total else 0.0

    organs, details, lesions = _ground_truth(anat, cond, out, grid, fraction)
    sigma = float(g_noise.uniform(*spec.noise))
    image = _acquire(out.hu[crop], smp.sub(crop), g_noise, sigma)
    image, affine = reorient(image, grid.affine, geo["code"])
    labels, _ = reorient(out.labels[crop], grid.affine, geo["code"])
    record = {
        "case_id": spec.case_id,
        "shape": list(image.shape),
        "spacing": [round(float(s), 4) for s in grid.spacing],
        "orientation": geo["code"],
        "fov_cut": geo["cut"],
        "fov_z_mm": [
            round(float(grid.origin[2]), 2),
            round(float(grid.origin[2] + grid.spacing[2] * (grid.shape[2] - 1)), 2),
        ],
        "noise_sigma": round(sigma, 2),
        "organs": organs,
        "in_view_fraction": {k: round(v, 3) for k, v in fraction.items()},
        "lesions": lesions,
        "details": details,
    }
    report = None
    if spec.report:
        findings_en, impressions_en, record["report"] = write_report(record, g_report)
        report = (findings_en, impressions_en)
    return Case(image, labels, affine, record, report)


def _ground_truth(anat: Anatomy, cond: Conditions, out: Rendered, grid: Grid, fraction: dict) -> tuple:
    """Per-organ status and findings as the scan shows them, and the visible lesions.

    A focal finding counts only if at least half of its lesion lies inside the scan, and an organ
    mostly outside the scan is "out_of_view" whatever else is true of it: neither its absence nor
    its findings can be seen.
    """
    crop = grid.crop
    visible = []
    for lesion, mask in zip(anat.lesions, out.lesion_masks, strict=True):
        n_all, n_in = int(mask.sum()), int(mask[crop].sum())
        if n_all and n_in >= 0.5 * n_all and fraction[lesion.organ] >= OUT_OF_VIEW_BELOW:
            visible.append((lesion, mask[crop]))
    organs, details = {}, {}
    for organ in PHANTOM_ORGANS:
        found = [
            f
            for f in cond.findings.get(organ, [])
            if f not in FOCAL or any(les.organ == organ and les.kind == f for les, _ in visible)
        ]
        if fraction[organ] < OUT_OF_VIEW_BELOW:
            organs[organ] = {"status": "out_of_view", "findings": []}
        elif organ in anat.absent:
            organs[organ] = {"status": "absent", "findings": [RESECTIONS[organ]]}
        else:
            organs[organ] = {"status": "abnormal" if found else "normal", "findings": found}
    if "splenomegaly" in organs["spleen"]["findings"]:
        length = 2 * float(anat.organs["spleen"][0].semi.max()) / 10
        details["spleen"] = {"splenomegaly": {"size_cm": round(length, 1)}}
    lesions = []
    axes = [grid.origin[k] + np.arange(grid.shape[k]) * grid.spacing[k] for k in range(3)]
    for lesion, mask in visible:
        if organs[lesion.organ]["status"] != "abnormal":
            continue
        idx = np.nonzero(mask)
        lesions.append(
            {
                "finding": lesion.kind,
                "organ": lesion.organ,
                "center_mm": [round(float(axes[k][idx[k]].mean()), 2) for k in range(3)],  # world RAS
                "radius_mm": round(float(lesion.radius), 2),
                **({} if lesion.semi is None else {"semi_mm": [round(float(v), 2) for v in lesion.semi]}),
                "voxels": len(idx[0]),
                "hu": None if lesion.hu is None else round(float(lesion.hu), 1),
                **lesion.info,
            }
        )
    return organs, details, lesions


def _acquire(hu: np.ndarray, q: Coords, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Scanner effects: a smooth multiplicative and additive bias, then white Gaussian noise."""
    # Kept mild (about +-10 HU in soft tissue) so it never rivals a lesion's contrast.
    gain = Waves.sample(rng, 3, (200.0, 500.0), 0.008)(q)
    offset = Waves.sample(rng, 3, (200.0, 500.0), 4.0)(q)
    img = (hu + 1000.0) * (1.0 + gain) - 1000.0 + offset
    img = img + rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)
