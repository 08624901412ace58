"""Physical-space primitives for the phantoms: shapes, smooth random fields, grids and orientations.

Everything is in millimetres in an anatomical frame with RAS+ axes (x toward the patient's
right, y anterior, z superior), the frame NIfTI affines map voxels into. Shapes are implicit
functions evaluated on arrays of coordinates, so a volume is rasterised with vectorised numpy
and no loop over voxels; each shape is evaluated only inside its bounding box (``Sampler``).
Parameters enter the arithmetic as Python floats so the float32 coordinate arrays stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


def rotation(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """Rotation matrix from angles in degrees about x, then y, then z."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Ellipsoid:
    """Solid ellipsoid: centre, semi-axes (mm) and an orientation matrix (columns = local axes)."""

    center: np.ndarray
    semi: np.ndarray
    rot: np.ndarray

    def inside(self, q: Coords) -> np.ndarray:
        c, s, r = self.center.tolist(), self.semi.tolist(), self.rot.tolist()
        d = [q[i] - c[i] for i in range(3)]
        level = 0.0
        for k in range(3):
            # Local coordinate along the k-th axis: R is orthonormal, so local = R^T d.
            local = d[0] * r[0][k] + d[1] * r[1][k] + d[2] * r[2][k]
            level = level + (local * (1.0 / s[k])) ** 2
        return level <= 1.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.rot * self.semi) ** 2).sum(axis=1))
        return self.center - half, self.center + half

    def scaled(self, factor: float, anchor: np.ndarray) -> Ellipsoid:
        """Grown or shrunk by ``factor`` about a fixed ``anchor`` point (organ enlargement)."""
        return replace(self, center=anchor + factor * (self.center - anchor), semi=self.semi * factor)

    def point(self, u: np.ndarray) -> np.ndarray:
        """Anatomical position of local unit-ball coordinates ``u`` (for placing lesions)."""
        return self.center + self.rot @ (np.asarray(u) * self.semi)


@dataclass(frozen=True)
class Prism:
    """An elliptic cylinder along z (spine, paraspinal muscles), optionally bounded in z."""

    center: tuple[float, float]
    semi: tuple[float, float]
    z_range: tuple[float, float] = (-1e4, 1e4)

    def inside(self, q: Coords) -> np.ndarray:
        (cx, cy), (sx, sy), (lo, hi) = self.center, self.semi, self.z_range
        inside = ((q[0] - cx) * (1.0 / sx)) ** 2 + ((q[1] - cy) * (1.0 / sy)) ** 2 <= 1.0
        return inside & (q[2] >= lo) & (q[2] <= hi)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        c, s = np.asarray(self.center), np.asarray(self.semi)
        return np.array([*(c - s), self.z_range[0]]), np.array([*(c + s), self.z_range[1]])


@dataclass(frozen=True)
class Tube:
    """Tube of varying radius around a polyline (pancreas, bowel); one pass per segment."""

    points: np.ndarray
    radii: np.ndarray

    def distance(self, q: Coords) -> np.ndarray:
        """Signed distance to the tube surface in mm (negative inside), min over segments."""
        best = None
        for a, b, ra, rb in zip(
            self.points[:-1].tolist(), self.points[1:].tolist(), self.radii[:-1], self.radii[1:], strict=True
        ):
            ab = [b[i] - a[i] for i in range(3)]
            inv = 1.0 / sum(v * v for v in ab)
            d = [q[i] - a[i] for i in range(3)]
            t = np.clip((d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) * inv, 0.0, 1.0)
            dist = np.sqrt((d[0] - t * ab[0]) ** 2 + (d[1] - t * ab[1]) ** 2 + (d[2] - t * ab[2]) ** 2)
            val = dist - (float(ra) + t * float(rb - ra))
            best = val if best is None else np.minimum(best, val)
        return best

    def inside(self, q: Coords) -> np.ndarray:
        return self.distance(q) <= 0.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = float(self.radii.max())
        return self.points.min(axis=0) - r, self.points.max(axis=0) + r

    def thinned(self, factor: float, min_radius: float = 0.0) -> Tube:
        return Tube(self.points, np.maximum(self.radii * factor, min_radius))


@dataclass(frozen=True)
class VTube:
    """A mostly craniocaudal tube (aorta, IVC, psoas): centre and radius interpolated along z.

    Distance is taken in the axial plane, which for near-vertical vessels matches the true
    distance and costs three ``np.interp`` calls whatever the number of nodes.
    """

    z: np.ndarray  # increasing node heights
    x: np.ndarray
    y: np.ndarray
    radii: np.ndarray

    @classmethod
    def from_nodes(cls, nodes: list[tuple[float, ...]], step: float = 5.0) -> VTube:
        points, radii = polyline(nodes, step=step)
        order = np.argsort(points[:, 2])
        return cls(points[order, 2], points[order, 0], points[order, 1], radii[order])

    def inside(self, q: Coords) -> np.ndarray:
        z = q[2]
        cx = np.interp(z, self.z, self.x).astype(np.float32)
        cy = np.interp(z, self.z, self.y).astype(np.float32)
        r = np.interp(z, self.z, self.radii).astype(np.float32)
        return ((q[0] - cx) ** 2 + (q[1] - cy) ** 2 <= r**2) & (z >= self.z[0]) & (z <= self.z[-1])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = float(self.radii.max())
        return (
            np.array([self.x.min() - r, self.y.min() - r, self.z[0]]),
            np.array([self.x.max() + r, self.y.max() + r, self.z[-1]]),
        )

    def with_profile(self, y: np.ndarray, radii: np.ndarray) -> VTube:
        return VTube(self.z, self.x, y, radii)


Shape = Ellipsoid | Prism | Tube | VTube


def polyline(nodes: list[tuple[float, ...]], step: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``(x, y, z, r)`` nodes every ``step`` mm so local radius edits stay smooth."""
    arr = np.asarray(nodes, dtype=float)
    seg = np.linalg.norm(np.diff(arr[:, :3], axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(np.ceil(s[-1] / step)) + 1)
    si = np.linspace(0.0, s[-1], n)
    out = np.stack([np.interp(si, s, arr[:, k]) for k in range(4)], axis=1)
    return out[:, :3], out[:, 3]


@dataclass(frozen=True)
class Waves:
    """A smooth random field: a sum of a few plane cosine waves (cheap, band-limited, seedable)."""

    k: np.ndarray  # (n, 3) wave vectors in rad/mm
    phase: np.ndarray  # (n,)
    amp: np.ndarray  # (n,)

    @classmethod
    def sample(
        cls, rng: np.random.Generator, n: int, wavelength: tuple[float, float], amplitude: float
    ) -> Waves:
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        lam = rng.uniform(*wavelength, size=n)
        amp = rng.uniform(0.5, 1.0, size=n) * amplitude / np.sqrt(n)
        return cls(direction * (2 * np.pi / lam)[:, None], rng.uniform(0, 2 * np.pi, size=n), amp)

    @property
    def bound(self) -> float:
        """Largest absolute value the field can take."""
        return float(np.abs(self.amp).sum())

    def __call__(self, q: Coords) -> np.ndarray:
        out = 0.0
        for k, p, a in zip(self.k.tolist(), self.phase.tolist(), self.amp.tolist(), strict=True):
            out = out + a * np.cos(q[0] * k[0] + q[1] * k[1] + q[2] * k[2] + p)
        return out


class Sampler:
    """Anatomical coordinates of a voxel grid, with bounding-box culling for shapes.

    ``index = M @ a + b`` maps an anatomical point (before the smooth warp) to voxel indices;
    ``margin`` (mm) bounds the warp, so a shape's box padded by it holds every voxel it can reach.
    """

    def __init__(self, q: Coords, m: np.ndarray, b: np.ndarray, margin: float) -> None:
        self.q, self.m, self.b, self.margin = q, m, b, margin
        self.shape = q[0].shape

    def region(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...] | None:
        lo, hi = np.asarray(lo) - self.margin, np.asarray(hi) + self.margin
        corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1)
        idx = self.m @ corners + self.b[:, None]
        start = np.maximum(np.floor(idx.min(axis=1)).astype(int) - 1, 0)
        stop = np.minimum(np.ceil(idx.max(axis=1)).astype(int) + 2, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))

    def sub(self, region: tuple[slice, ...]) -> Coords:
        return tuple(c[region] for c in self.q)

    def mask(self, shapes: list[Shape]) -> np.ndarray:
        """Voxels inside any of ``shapes``, each evaluated only in its own bounding box."""
        out = np.zeros(self.shape, dtype=bool)
        for shape in shapes:
            region = self.region(*shape.bounds())
            if region is not None:
                out[region] |= shape.inside(self.sub(region))
        return out

    def field(self, waves: Waves, region: tuple[slice, ...] | None = None) -> np.ndarray:
        return waves(self.q if region is None else self.sub(region)).astype(np.float32)


# Voxel axis flips for each stored orientation, relative to the RAS grid the phantom is built on.
ORIENTATIONS: dict[str, tuple[bool, bool, bool]] = {
    "RAS": (False, False, False),
    "LPS": (True, True, False),
    "LPI": (True, True, True),
    "RAI": (False, False, True),
}


def reorient(data: np.ndarray, affine: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """Flip the voxel axes of a RAS-ordered array into ``code`` and adjust the affine to match.

    The world position of every voxel is unchanged, so any reader that honours the affine
    (``monai.transforms.Orientation``, ITK, viewers) sees the same anatomy.
    """
    affine = affine.copy()
    for axis, flip in enumerate(ORIENTATIONS[code]):
        if flip:
            n = data.shape[axis]
            affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * (n - 1)
            affine[:3, axis] = -affine[:3, axis]
            data = np.flip(data, axis=axis)
    return np.ascontiguousarray(data), affine


@dataclass(frozen=True)
class Grid:
    """An axis-aligned voxel grid in world mm, padded beyond the stored field of view.

    The padding lets the generator measure how much of each organ lies outside the scan (field of
    view truncation) from the same rasterisation that makes the image.
    """

    origin: np.ndarray  # world position of stored voxel (0, 0, 0), RAS order
    spacing: np.ndarray
    shape: tuple[int, int, int]
    pad_lo: tuple[int, int, int]
    pad_hi: tuple[int, int, int]

    @property
    def affine(self) -> np.ndarray:
        aff = np.eye(4)
        aff[:3, :3] = np.diag(self.spacing)
        aff[:3, 3] = self.origin
        return aff

    @property
    def crop(self) -> tuple[slice, slice, slice]:
        return tuple(slice(lo, lo + n) for lo, n in zip(self.pad_lo, self.shape, strict=True))

    @property
    def padded_origin(self) -> np.ndarray:
        return self.origin - np.asarray(self.pad_lo) * self.spacing

    def world(self) -> Coords:
        """Broadcastable world coordinates of the padded grid."""
        axes = []
        for k in range(3):
            idx = np.arange(self.shape[k] + self.pad_lo[k] + self.pad_hi[k], dtype=np.float64)
            shape = [1, 1, 1]
            shape[k] = idx.size
            axes.append((self.padded_origin[k] + idx * self.spacing[k]).astype(np.float32).reshape(shape))
        return axes[0], axes[1], axes[2]

    @classmethod
    def covering(
        cls,
        origin: np.ndarray,
        spacing: np.ndarray,
        shape: tuple[int, int, int],
        lo: np.ndarray,
        hi: np.ndarray,
    ) -> Grid:
        """A grid whose padding reaches the world box ``[lo, hi]`` on every side."""
        end = origin + spacing * (np.asarray(shape) - 1)
        pad_lo = np.maximum(0, np.ceil((origin - lo) / spacing)).astype(int)
        pad_hi = np.maximum(0, np.ceil((hi - end) / spacing)).astype(int)
        return cls(origin, spacing, shape, tuple(int(v) for v in pad_lo), tuple(int(v) for v in pad_hi))
