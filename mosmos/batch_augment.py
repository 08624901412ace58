"""Train-time augmentation of a whole batch in one pass, on the batch's device.

:func:`mosmos.transforms.build_augment` augments one item at a time with MONAI's dictionary
transforms (``RandAffined``, ``RandScaleIntensityd``, ``RandShiftIntensityd``,
``RandGaussianNoised``). In stage 1 that ran in the training process between steps, per sample,
and took as long as the model step itself on a 2-core CPU (benchmarks/run.py). :class:`BatchAugment`
draws the same random family from the same distributions, per sample, and applies it to the whole
batch at once: one ``torch.nn.functional.grid_sample`` call for the affine, tensor ops for the
intensity changes, on whatever device the batch is on (a GPU during GPU training).

Why not a library: MONAI's spatial transforms take one item at a time, and its batched spatial
transformer (``monai.networks.layers.AffineTransform``) does not use the voxel convention of
``RandAffine`` (an integer shift of 2 voxels comes out interpolated, 0.12 off); the grid here is
built in ``RandAffine``'s convention and tested against MONAI's ``Affine`` item by item
(tests/test_batch_augment.py).

Each sample's draw depends only on its own seed (the caller derives it from (run seed, epoch,
case index)), never on the batch it lands in, so runs are reproducible for any batch composition,
worker count or resume point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms.utils import create_rotate, create_scale, create_translate

from mosmos.transforms import PreprocessConfig, resolve_augment

__all__ = ["BatchAugment", "SampleDraw"]


@dataclass
class SampleDraw:
    """One sample's random augmentation: a pull affine in centred voxel coordinates (``None``: no
    affine), an intensity factor and offset (``None``: not applied) and a noise std (``None``: none)."""

    affine: np.ndarray | None
    scale: float | None
    shift: float | None
    noise_std: float | None
    noise_seed: int


class BatchAugment:
    """The augmentation of :func:`mosmos.transforms.build_augment`, applied to a batch at once.

    Per sample, as MONAI draws it: with probability ``affine_prob`` one affine with rotation
    ``U(-r, r)`` about each axis, scale ``1 + U(-s, s)`` per axis and translation ``U(-t, t)`` ×
    size voxels per axis, composed rotate @ translate @ scale and pulled in centred voxel
    coordinates, bilinear for images and nearest for masks, padding with air (images) and 0
    (masks); then, independently with probability ``intensity_prob`` each, a factor ``1 + U(-a, a)``
    and an offset ``U(-b, b)``; then with probability ``noise_prob`` gaussian noise of std
    ``U(0, noise_std)``.

    Args:
        cfg: the preprocessing config (volume size, air value).
        augment: overrides of :data:`mosmos.transforms.AUGMENT_DEFAULTS`.

    Example::

        aug = BatchAugment(preprocess, {"rotate_deg": 0})
        image, (body,) = aug(batch["image"], [batch["body_mask"]], seeds=[11, 12, 13])
    """

    def __init__(self, cfg: PreprocessConfig, augment: Mapping[str, float] | None = None) -> None:
        self.cfg = cfg
        self.options = resolve_augment(augment)
        self.air = float(cfg.air_value)

    def draw(self, seed: int) -> SampleDraw:
        """The random parameters of one sample, a function of ``seed`` only."""
        a, size = self.options, self.cfg.size
        rng = np.random.default_rng(seed)
        affine = None
        if rng.random() < a["affine_prob"]:
            rot = math.radians(a["rotate_deg"])
            rotate = rng.uniform(-rot, rot, 3) if rot > 0 else np.zeros(3)
            translate = np.array([rng.uniform(-a["translate"] * s, a["translate"] * s) for s in size])
            scale = 1.0 + rng.uniform(-a["scale"], a["scale"], 3)
            affine = create_rotate(3, rotate) @ create_translate(3, translate) @ create_scale(3, scale)
        scale_f = shift = noise = None
        if rng.random() < a["intensity_prob"]:
            scale_f = 1.0 + rng.uniform(-a["intensity_scale"], a["intensity_scale"])
        if rng.random() < a["intensity_prob"]:
            shift = rng.uniform(-a["intensity_shift"], a["intensity_shift"])
        if rng.random() < a["noise_prob"]:
            noise = rng.uniform(0.0, a["noise_std"])
        return SampleDraw(affine, scale_f, shift, noise, int(rng.integers(2**31)))

    def __call__(
        self, image: torch.Tensor, masks: Sequence[torch.Tensor] = (), seeds: Sequence[int] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Augment ``image`` ``[B, C, *spatial]`` (float) and each of ``masks`` ``[B, C', *spatial]``
        (any dtype; resampled nearest and returned in their dtype) with one draw per seed."""
        if image.ndim != 5:
            raise ValueError(f"BatchAugment needs [B, C, D, H, W] volumes, got {tuple(image.shape)}")
        if len(seeds) != image.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {image.shape[0]}")
        draws = [self.draw(int(s)) for s in seeds]
        image = image.float()
        masks = list(masks)
        moved = [i for i, d in enumerate(draws) if d.affine is not None]
        if moved:
            theta = _normalised_theta([draws[i].affine for i in moved], image.shape[2:]).to(image.device)
            grid = F.affine_grid(theta, [len(moved), 1, *image.shape[2:]], align_corners=True)
            idx = torch.tensor(moved, device=image.device)
            warped = F.grid_sample(image[idx] - self.air, grid, "bilinear", "zeros", align_corners=True)
            image = image.index_copy(0, idx, warped + self.air)
            for m, mask in enumerate(masks):
                sampled = F.grid_sample(mask[idx].float(), grid, "nearest", "zeros", align_corners=True)
                masks[m] = mask.index_copy(0, idx, sampled.to(mask.dtype))
        factor = torch.tensor([d.scale if d.scale is not None else 1.0 for d in draws])
        offset = torch.tensor([d.shift if d.shift is not None else 0.0 for d in draws])
        view = (-1,) + (1,) * (image.ndim - 1)
        if (factor != 1).any() or (offset != 0).any():
            image = image * factor.to(image).view(view) + offset.to(image).view(view)
        noisy = [i for i, d in enumerate(draws) if d.noise_std is not None]
        if noisy:
            noise = torch.stack(
                [
                    torch.randn(image.shape[1:], generator=torch.Generator().manual_seed(draws[i].noise_seed))
                    * draws[i].noise_std
                    for i in noisy
                ]
            ).to(image)
            image = image.index_add(0, torch.tensor(noisy, device=image.device), noise)
        return image, masks


def _normalised_theta(affines: Sequence[np.ndarray], spatial: Sequence[int]) -> torch.Tensor:
    """``[N, 3, 4]`` thetas for ``F.affine_grid(align_corners=True)`` from pull affines in centred
    voxel coordinates (axis order of the array).

    With ``align_corners=True`` index ``i`` of an axis of size ``n`` is at ``2 i / (n - 1) - 1``, so
    centred coordinate ``c = i - (n - 1) / 2`` is at ``c * 2 / (n - 1)``: ``theta = D A D^-1`` with
    ``D = diag(2 / (n - 1))``, and grid_sample's last grid coordinate indexes the first array axis,
    so the axes are reversed.
    """
    n = np.asarray(spatial, dtype=np.float64)
    d = np.diag(np.append(2.0 / np.maximum(n - 1, 1), 1.0))
    d_inv = np.diag(np.append(np.maximum(n - 1, 1) / 2.0, 1.0))
    rev = np.eye(4)[[2, 1, 0, 3]]
    thetas = [(rev @ d @ a @ d_inv @ rev)[:3] for a in affines]
    return torch.as_tensor(np.stack(thetas), dtype=torch.float32)
