"""The abdominal phantom: organ geometry and tissue densities in Hounsfield units.

Coordinates are millimetres in the patient's RAS+ frame (x toward the patient's right, y anterior,
z superior) with the origin near the first lumbar vertebra. The layout follows textbook anatomy
at a slightly compressed craniocaudal scale so that a 40-slice volume holds the whole abdomen:
liver right-upper, spleen left-upper-posterior, kidneys paravertebral, aorta anterior-left of the
spine with the IVC to its right, pancreas transverse in front of the aorta and left kidney,
stomach left-upper-anterior, gallbladder under the liver, bladder in the pelvis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mosmos.synth.geometry import Coords, Ellipsoid, Prism, Sampler, Shape, Tube, VTube, Waves, rotation

#: Canonical vocabulary names of the organs the phantom models, in vocabulary order.
PHANTOM_ORGANS: list[str] = [
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "pancreas",
    "stomach",
    "gallbladder",
    "aorta",
    "duodenum",
    "inferior_vena_cava",
    "urinary_bladder",
]

# Which organ keeps a voxel where two shapes overlap: small and tubular structures first, so the
# big parenchymal organs wrap around them (the IVC runs through the liver, the gallbladder sits
# in its fossa) and no organ is left with holes.
PRIORITY: list[str] = [
    "aorta",
    "inferior_vena_cava",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "pancreas",
    "spleen",
    "stomach",
    "duodenum",
    "urinary_bladder",
    "liver",
]

# Anchors (mm) about which enlarged organs grow: enlargement extends inferiorly and medially, as
# it does under the ribs and diaphragm.
LIVER_ANCHOR = np.array([95.0, -10.0, 120.0])
SPLEEN_ANCHOR = np.array([-100.0, -70.0, 112.0])


@dataclass
class Lesion:
    """A focal finding: a sphere or axis-aligned ellipsoid (mm), painted with ``hu`` in its organ's label."""

    kind: str
    organ: str
    center: np.ndarray
    radius: float
    hu: float | None  # None: changes geometry only (aneurysm), nothing to paint
    info: dict = field(default_factory=dict)  # what a report says about it (size, location)
    semi: np.ndarray | None = None  # ellipsoid semi-axes (mm, x y z); None: a sphere of ``radius``
    intraluminal: bool = False  # inside the organ's lumen (stone, thrombus): never grows the label

    def shape(self) -> Ellipsoid:
        semi = np.full(3, float(self.radius)) if self.semi is None else np.asarray(self.semi, dtype=float)
        return Ellipsoid(np.asarray(self.center, dtype=float), semi, np.eye(3))


@dataclass
class Anatomy:
    """One case's geometry and densities, before pathology is applied (then edited in place)."""

    organs: dict[str, list[Shape]]
    hu: dict[str, float]
    cavity_semi: np.ndarray  # inner abdominal wall, ellipse semi-axes in x, y
    muscle: float
    fat: float
    stomach_gas_level: float
    texture: Waves
    gas_texture: Waves
    lesions: list[Lesion] = field(default_factory=list)
    clips: list[tuple[np.ndarray, float]] = field(default_factory=list)  # surgical clips: centre, radius
    absent: set[str] = field(default_factory=set)


def _jitter(rng: np.random.Generator, xyz: tuple[float, float, float], mm: float) -> np.ndarray:
    return np.asarray(xyz, dtype=float) + rng.normal(0.0, mm, size=3)


def _ellipsoid(
    rng: np.random.Generator, center: tuple, semi: tuple, angles: tuple = (0, 0, 0), shift: float = 4.0
) -> Ellipsoid:
    """An ellipsoid with per-case jitter of position (σ 4 mm), size (±8 %) and orientation (σ 4°)."""
    semi_j = np.asarray(semi, dtype=float) * rng.uniform(0.92, 1.08, size=3)
    ang = np.asarray(angles, dtype=float) + rng.normal(0.0, 4.0, size=3)
    return Ellipsoid(_jitter(rng, center, shift), semi_j, rotation(*ang))


def _nodes(rng: np.random.Generator, nodes: list[tuple], shift: float) -> list[tuple]:
    return [
        (*(np.asarray(n[:3]) + rng.normal(0.0, shift, size=3)), n[3] * rng.uniform(0.9, 1.1)) for n in nodes
    ]


def _tube(rng: np.random.Generator, nodes: list[tuple], shift: float = 3.0) -> Tube:
    """A tube through jittered nodes; one segment per node pair keeps rasterisation cheap."""
    arr = np.asarray(_nodes(rng, nodes, shift))
    return Tube(arr[:, :3], arr[:, 3])


def _vtube(rng: np.random.Generator, nodes: list[tuple], shift: float = 2.0) -> VTube:
    return VTube.from_nodes(_nodes(rng, nodes, shift))


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a normal anatomy: organ shapes with random size/position/orientation and tissue HU."""
    side = {"kidney_right": 1.0, "kidney_left": -1.0}
    organs: dict[str, list[Shape]] = {
        "liver": [
            _ellipsoid(rng, (62, 10, 68), (55, 72, 55), (0, 0, -10)),
            _ellipsoid(rng, (-12, 44, 92), (42, 26, 27), (0, 10, 0)),
        ],
        "spleen": [_ellipsoid(rng, (-82, -40, 72), (20, 42, 48), (0, -8, -35))],
        "pancreas": [
            _tube(
                rng, [(28, 8, 2, 14), (8, 18, 14, 11), (-25, 12, 22, 10), (-60, 0, 30, 9), (-76, -14, 36, 8)]
            )
        ],
        "stomach": [
            _ellipsoid(rng, (-48, 28, 72), (30, 27, 42), (15, 0, -20)),
            _tube(rng, [(-40, 40, 40, 19), (-15, 52, 30, 16), (5, 45, 35, 12)]),
        ],
        "gallbladder": [_ellipsoid(rng, (42, 40, 18), (13, 15, 28), (25, 0, 10), shift=3.0)],
        "duodenum": [
            _tube(
                rng,
                [
                    (5, 45, 35, 10),
                    (30, 30, 28, 11),
                    (44, 10, 10, 11),
                    (44, 6, -20, 11),
                    (35, 13, -42, 10),
                    (5, 15, -48, 10),
                    (-22, 12, -42, 10),
                    (-30, 14, -25, 10),
                ],
            )
        ],
        "aorta": [
            _vtube(rng, [(-12, -20, 140, 11), (-15, -16, 60, 10.5), (-15, -13, -20, 10), (-11, -12, -75, 9)])
        ],
        "inferior_vena_cava": [_vtube(rng, [(20, -10, -85, 11), (20, -10, 30, 11.5), (22, -5, 135, 12)])],
        "urinary_bladder": [_ellipsoid(rng, (0, 38, -110), (42, 32, 28), shift=5.0)],
    }
    for kidney, s in side.items():
        z = -12.0 if s > 0 else 3.0  # the right kidney sits lower, under the liver
        organs[kidney] = [_ellipsoid(rng, (55 * s, -40, z), (24, 20, 52), (0, 10 * s, 15 * s))]
    kidney_hu = rng.uniform(140, 170)
    hu = {
        "liver": rng.uniform(55, 70),
        "spleen": rng.uniform(45, 55),
        "kidney_right": kidney_hu,
        "kidney_left": kidney_hu,
        "pancreas": rng.uniform(40, 50),
        "stomach": rng.uniform(35, 45),
        "gallbladder": rng.uniform(5, 15),
        "duodenum": rng.uniform(25, 35),
        "aorta": rng.uniform(160, 200),
        "inferior_vena_cava": rng.uniform(125, 150),
        "urinary_bladder": rng.uniform(5, 15),
        "gastric_fluid": rng.uniform(5, 15),
        "fat": rng.uniform(-110, -90),
        "muscle": rng.uniform(45, 55),
        "bowel": rng.uniform(20, 35),
        "bone": rng.uniform(400, 550),
        "lung": rng.uniform(-870, -830),
    }
    return Anatomy(
        organs=organs,
        hu=hu,
        cavity_semi=np.array([118.0, 92.0]) * rng.uniform(0.97, 1.03, size=2),
        muscle=rng.uniform(8, 14),
        fat=rng.uniform(8, 40),
        stomach_gas_level=rng.uniform(0.3, 0.8),
        texture=Waves.sample(rng, 10, (30.0, 70.0), 1.0),
        gas_texture=Waves.sample(rng, 8, (20.0, 50.0), 1.0),
    )


def ball(center: np.ndarray, radius: float) -> Ellipsoid:
    return Ellipsoid(np.asarray(center, dtype=float), np.full(3, float(radius)), np.eye(3))


def _ellipses(anat: Anatomy, q: Coords) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cavity, abdominal wall and skin outlines (elliptic cylinders): normalised squared radii."""
    x, y = q[0], q[1]
    a, b = anat.cavity_semi.tolist()
    out = []
    for extra in (0.0, anat.muscle, anat.muscle + anat.fat):
        out.append((x * (1.0 / (a + extra))) ** 2 + (y * (1.0 / (b + extra))) ** 2)
    return out[0], out[1], out[2]


def _fixed_tissues(anat: Anatomy, smp: Sampler) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint everything that carries no organ label; return (hu, cavity mask, skeleton mask)."""
    q = smp.q
    cav, wall, skin = _ellipses(anat, q)
    hu = np.full(smp.shape, -1000.0, dtype=np.float32)
    hu[skin <= 1] = anat.hu["fat"]
    hu[wall <= 1] = anat.hu["muscle"]
    cavity = cav <= 1
    hu[cavity] = anat.hu["fat"] + 10.0  # visceral fat
    a, b = anat.cavity_semi.tolist()
    # Bowel loops and their gas fill the abdomen below the upper organs.
    region = smp.region(np.array([-a, -b, -135.0]), np.array([a, b, 35.0]))
    if region is not None:
        sub = smp.sub(region)
        bowel = cavity[region] & (sub[2] < 35) & (sub[2] > -135) & (anat.texture(sub) > 0.1)
        gas = bowel & (anat.gas_texture(sub) > 0.65)
        hu[region][bowel] = anat.hu["bowel"]
        hu[region][gas] = -700.0
    thorax = [
        (Ellipsoid(np.array([-10.0, 25, 185]), np.array([60.0, 50, 50]), np.eye(3)), anat.hu["muscle"] - 10),
        (Ellipsoid(np.array([68.0, -10, 200]), np.array([50.0, 75, 105]), np.eye(3)), anat.hu["lung"]),
        (Ellipsoid(np.array([-68.0, -10, 205]), np.array([48.0, 75, 105]), np.eye(3)), anat.hu["lung"]),
    ]
    for shape, value in thorax:
        hu[smp.mask([shape]) & cavity] = value
    for s in (1.0, -1.0):
        muscles = [
            Prism((32 * s, -78.0), (20.0, 14.0)),  # paraspinal
            VTube.from_nodes([(25 * s, -40, 40, 6), (40 * s, -35, -60, 18), (55 * s, -20, -130, 20)], 10.0),
        ]
        hu[smp.mask(muscles)] = anat.hu["muscle"]
        iliac = VTube.from_nodes([(-11, -12, -75, 7), (45 * s - 5, -10, -140, 6)], 10.0)
        hu[smp.mask([iliac]) & cavity] = anat.hu["aorta"]
    vertebra = Prism((0.0, -45.0), (20.0, 16.0))
    bones: list[Shape] = [vertebra, Prism((0.0, -72.0), (22.0, 9.0)), Prism((0.0, -88.0), (5.0, 10.0))]
    bones += [
        Ellipsoid(np.array([90.0 * s, -35, -95]), np.array([12.0, 40, 38]), rotation(0, 0, 35 * s))
        for s in (1, -1)
    ]
    bones += [ball(np.array([80.0 * s, 5, -170]), 24.0) for s in (1, -1)]
    bones.append(Ellipsoid(np.array([0.0, -62, -105]), np.array([38.0, 15, 40]), rotation(-20, 0, 0)))
    bone = smp.mask(bones)
    # Lower ribs: slanted bands in the body wall around the liver and spleen.
    region = smp.region(np.array([-1.1 * a, -1.1 * b, 25.0]), np.array([1.1 * a, 1.1 * b, 1e4]))
    if region is not None:
        _, y, z = smp.sub(region)
        ring = np.sqrt(cav[region])
        band = np.sin((z + 0.35 * y) * (2 * np.pi / 30.0)) > 0.55
        bone[region] |= (z > 25) & (ring > 1.0) & (ring < 1.07) & band
    hu[bone] = anat.hu["bone"]
    disc = smp.mask([vertebra]) & (np.mod(q[2] + 8.0, 34.0) < 7.0)
    hu[disc] = anat.hu["muscle"] + 30
    return hu, cavity, bone  # discs stay in the bone mask: organs must not fill intervertebral gaps


def organ_shapes(anat: Anatomy, organ: str) -> list[Shape]:
    """An organ's shapes including its lesions (labels cover lesions, as in real datasets)."""
    shapes = list(anat.organs[organ])
    for lesion in anat.lesions:
        if lesion.organ == organ and lesion.hu is not None and not lesion.intraluminal:
            shapes.append(lesion.shape())
    return shapes


@dataclass
class Rendered:
    """A rasterised phantom on a (padded) grid, before noise."""

    hu: np.ndarray
    labels: np.ndarray  # uint8, 1 + index in PHANTOM_ORGANS
    organ_masks: dict[str, np.ndarray]  # would-be extent of each organ (also when resected)
    lesion_masks: list[np.ndarray]


def render(anat: Anatomy, smp: Sampler) -> Rendered:
    """Rasterise ``anat`` on the sampler's grid into HU and organ labels."""
    hu, cavity, bone = _fixed_tissues(anat, smp)
    allowed = cavity & ~bone
    labels = np.zeros(hu.shape, dtype=np.uint8)
    masks: dict[str, np.ndarray] = {}
    for organ in PRIORITY:
        raw = smp.mask(organ_shapes(anat, organ)) & allowed
        masks[organ] = raw
        if organ in anat.absent:
            continue
        claim = raw & (labels == 0)
        labels[claim] = PHANTOM_ORGANS.index(organ) + 1
        hu[claim] = anat.hu[organ]
    _organ_detail(anat, smp, labels, hu)
    lesion_masks = []
    for lesion in anat.lesions:
        region = smp.mask([lesion.shape()]) & (labels == PHANTOM_ORGANS.index(lesion.organ) + 1)
        if lesion.hu is not None:
            hu[region] = lesion.hu
        lesion_masks.append(region)
    for center, radius in anat.clips:
        hu[smp.mask([ball(center, radius)]) & cavity] = 2000.0
    return Rendered(hu, labels, masks, lesion_masks)


def _organ_detail(anat: Anatomy, smp: Sampler, labels: np.ndarray, hu: np.ndarray) -> None:
    """Internal structure that makes organs look like organs: gastric contents, renal medulla."""
    stomach = labels == PHANTOM_ORGANS.index("stomach") + 1
    fundus, antrum = anat.organs["stomach"]
    lumen_shapes = [
        Ellipsoid(fundus.center, fundus.semi - 5.0, fundus.rot),
        Tube(antrum.points, antrum.radii - 5.0),
    ]
    lumen = stomach & smp.mask(lumen_shapes)
    hu[lumen] = anat.hu["gastric_fluid"]
    # Swallowed air floats to the anterior (non-dependent) part of the lumen in a supine patient.
    gas_y = float(fundus.center[1] + anat.stomach_gas_level * fundus.semi[1])
    hu[lumen & (smp.q[1] > gas_y)] = -800.0
    for kidney in ("kidney_right", "kidney_left"):
        k = anat.organs[kidney][0]
        medulla = smp.mask([Ellipsoid(k.center, k.semi * 0.55, k.rot)])
        hu[medulla & (labels == PHANTOM_ORGANS.index(kidney) + 1)] = anat.hu[kidney] - 45.0
