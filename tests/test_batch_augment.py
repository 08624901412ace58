"""BatchAugment: the augmentation of build_augment, applied to a whole batch, checked against MONAI
item by item and against its own draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Affine

from mosmos.batch_augment import BatchAugment
from mosmos.transforms import PreprocessConfig

CFG = PreprocessConfig(spacing=(2.0, 2.0, 2.0), size=(20, 16, 12))
ONLY_AFFINE = {"affine_prob": 1, "intensity_prob": 0, "noise_prob": 0, "rotate_deg": 15, "scale": 0.15}


def _volumes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, *CFG.size, generator=g)
    labels = torch.randint(0, 4, (n, 1, *CFG.size), generator=g).to(torch.int16)
    return image, labels


def test_affine_matches_monai_item_by_item():
    """Each sample's warp equals MONAI's Affine with the drawn matrix (bilinear image, nearest labels),
    including the air value: the image is padded with air, not with 0."""
    cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.0), size=CFG.size, hu_window=(-1500.0, 500.0))
    assert cfg.air_value == 0.25
    aug = BatchAugment(cfg, ONLY_AFFINE)
    image, labels = _volumes(4)
    seeds = [3, 17, 256, 9001]
    out, (lab,) = aug(image, [labels], seeds)
    for i, s in enumerate(seeds):
        affine = aug.draw(s).affine
        assert affine is not None and not np.allclose(affine, np.eye(4))
        ref = (
            Affine(affine=affine, mode="bilinear", padding_mode="zeros", image_only=True)(image[i] - 0.25)
            + 0.25
        )
        ref = torch.as_tensor(ref)
        assert (out[i] - ref).abs().max() <= 1e-5 * ref.abs().max()
        ref_lab = torch.as_tensor(
            Affine(affine=affine, mode="nearest", padding_mode="zeros", image_only=True)(labels[i].float())
        )
        # nearest neighbour may round a coordinate that sits on a half voxel either way
        assert (lab[i].float() == ref_lab).float().mean() > 0.995
    assert lab.dtype == torch.int16
    # somewhere the volume moved out of the field of view and was padded with air
    assert (out == 0.25).any()


def test_draws_are_per_sample_and_follow_the_probabilities():
    aug = BatchAugment(CFG, {"affine_prob": 0.5, "intensity_prob": 0.3, "noise_prob": 0.2, "noise_std": 0.05})
    draws = [aug.draw(s) for s in range(2000)]
    assert abs(np.mean([d.affine is not None for d in draws]) - 0.5) < 0.05
    assert abs(np.mean([d.scale is not None for d in draws]) - 0.3) < 0.05
    assert abs(np.mean([d.shift is not None for d in draws]) - 0.3) < 0.05
    assert abs(np.mean([d.noise_std is not None for d in draws]) - 0.2) < 0.04
    stds = [d.noise_std for d in draws if d.noise_std is not None]
    assert min(stds) >= 0 and max(stds) <= 0.05 and abs(np.mean(stds) - 0.025) < 0.005  # U(0, std)
    # A = R T S: the translation column is R t, as long as t, with |t_i| <= 5 % of the size
    shifts = np.stack([d.affine[:3, 3] for d in draws if d.affine is not None])
    assert np.linalg.norm(shifts, axis=1).max() <= np.linalg.norm(0.05 * np.asarray(CFG.size)) + 1e-9
    a, b = aug.draw(7), aug.draw(7)
    assert (a.scale, a.shift, a.noise_std, a.noise_seed) == (b.scale, b.shift, b.noise_std, b.noise_seed)
    assert (a.affine is None and b.affine is None) or np.array_equal(a.affine, b.affine)


def test_sample_does_not_depend_on_its_batch():
    aug = BatchAugment(CFG, {"affine_prob": 0.7, "intensity_prob": 0.7, "noise_prob": 0.7})
    image, labels = _volumes(5)
    seeds = [11, 12, 13, 14, 15]
    whole, (lab,) = aug(image, [labels], seeds)
    for i in (0, 3):
        alone, (lab1,) = aug(image[i : i + 1], [labels[i : i + 1]], [seeds[i]])
        assert torch.allclose(whole[i], alone[0], rtol=0, atol=1e-6)
        assert torch.equal(lab[i], lab1[0])


def test_intensity_and_noise_are_the_drawn_ones():
    image, _ = _volumes(6)
    aug = BatchAugment(CFG, {"affine_prob": 0, "intensity_prob": 1, "noise_prob": 0})
    out, _ = aug(image, [], list(range(6)))
    for i in range(6):
        d = aug.draw(i)
        assert torch.allclose(out[i], image[i] * d.scale + d.shift, rtol=1e-6, atol=1e-6)
    aug = BatchAugment(CFG, {"affine_prob": 0, "intensity_prob": 0, "noise_prob": 1, "noise_std": 0.1})
    out, _ = aug(image, [], list(range(6)))
    for i in range(6):
        residual = out[i] - image[i]
        assert abs(residual.std().item() - aug.draw(i).noise_std) < 0.05 * aug.draw(i).noise_std + 1e-3
        assert abs(residual.mean().item()) < 0.05 * aug.draw(i).noise_std + 1e-3


def test_nothing_drawn_leaves_the_batch_alone():
    image, labels = _volumes(3)
    aug = BatchAugment(CFG, {"affine_prob": 0, "intensity_prob": 0, "noise_prob": 0})
    out, (lab,) = aug(image, [labels], [1, 2, 3])
    assert torch.equal(out, image) and torch.equal(lab, labels)


def test_bad_input_is_a_clear_error():
    aug = BatchAugment(CFG)
    with pytest.raises(ValueError, match="seeds for a batch of 2"):
        aug(torch.zeros(2, 1, *CFG.size), [], [1])
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        aug(torch.zeros(1, *CFG.size), [], [1])
