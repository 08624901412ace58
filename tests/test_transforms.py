"""Shared CT preprocessing (mosmos.transforms) and its on-disk cache (mosmos.cache)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, MapTransform

from mosmos.cache import cache_key, cached_dataset
from mosmos.errors import ConfigError, DataError
from mosmos.transforms import (
    PreprocessConfig,
    build_augment,
    build_preprocess,
    load_volume_meta,
    resolve_augment,
)

# Phantom in LPS voxel order, spacing (1, 1, 4) mm: a soft-tissue box (40 HU) in air (-1000 HU) with
# an air pocket (-900 HU, a "lung") inside it, and two labelled organs.
SHAPE = (24, 20, 8)
LPS_AFFINE = np.diag([-1.0, -1.0, 4.0, 1.0])
BOX = (slice(4, 20), slice(4, 16), slice(1, 7))
POCKET = (slice(8, 12), slice(8, 12), slice(3, 5))
MARKER = (2, 3, 1)  # single labelled voxel outside the body, for orientation checks


def write_phantom(folder: Path, name: str = "case", affine: np.ndarray = LPS_AFFINE) -> tuple[Path, Path]:
    """Writes ``name.nii.gz`` (HU) and ``name_seg.nii.gz`` (labels 0, 1, 2, 3) and returns both paths."""
    img = np.full(SHAPE, -1000.0, dtype=np.float32)
    img[BOX] = 40.0
    img[POCKET] = -900.0
    lab = np.zeros(SHAPE, dtype=np.int16)
    lab[6:10, 6:10, 2:4] = 1
    lab[14:18, 10:14, 4:6] = 2
    lab[MARKER] = 3
    folder.mkdir(parents=True, exist_ok=True)
    img_path, lab_path = folder / f"{name}.nii.gz", folder / f"{name}_seg.nii.gz"
    nib.save(nib.Nifti1Image(img, affine), img_path)
    nib.save(nib.Nifti1Image(lab, affine), lab_path)
    return img_path, lab_path


def _run(cfg: PreprocessConfig, img: Path, lab: Path) -> dict:
    return build_preprocess(cfg, label_keys=("label",))({"image": str(img), "label": str(lab)})


def test_config_roundtrip_fingerprint_and_validation():
    cfg = PreprocessConfig(spacing=(1.5, 1.5, 3), size=(32, 32, 16))
    again = PreprocessConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert cfg.to_dict()["spacing"] == [1.5, 1.5, 3.0]
    assert PreprocessConfig(spacing=(2, 1.5, 3), size=(32, 32, 16)).fingerprint() != cfg.fingerprint()
    with pytest.raises(ConfigError, match="valid keys"):
        PreprocessConfig.from_dict({**cfg.to_dict(), "spacingg": [1, 1, 1]})
    with pytest.raises(ConfigError, match="spacing"):
        PreprocessConfig(spacing=(1, 1))
    with pytest.raises(ConfigError, match="hu_window"):
        PreprocessConfig(hu_window=(300, -200))
    with pytest.raises(ConfigError, match="pad_crop"):
        PreprocessConfig(resize_mode="stretch")
    with pytest.raises(ConfigError, match="valid keys"):
        resolve_augment({"rotate": 5})
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        resolve_augment({"noise_prob": 2})


def test_lps_volume_comes_out_ras(tmp_path):
    img, lab = write_phantom(tmp_path)
    cfg = PreprocessConfig(spacing=(1, 1, 4), size=SHAPE, crop_foreground=False)
    out = _run(cfg, img, lab)
    assert nib.aff2axcodes(out["image"].affine.numpy()) == ("R", "A", "S")
    # L->R and P->A flip the first two axes; the marker voxel moves accordingly
    x, y, z = MARKER
    assert out["label"][0, SHAPE[0] - 1 - x, SHAPE[1] - 1 - y, z] == 3
    assert int((out["label"] == 3).sum()) == 1


def test_resampling_window_mask_and_padding(tmp_path):
    img, lab = write_phantom(tmp_path)
    cfg = PreprocessConfig(spacing=(2, 2, 2), size=(16, 16, 16))
    out = _run(cfg, img, lab)
    image, mask, label = out["image"], out["body_mask"], out["label"]
    for t in (image, mask, label):
        assert t.shape == (1, 16, 16, 16)
    assert np.allclose(np.abs(np.diag(image.affine.numpy())[:3]), (2, 2, 2))
    assert image.dtype == torch.float32 and mask.dtype == torch.uint8 and label.dtype == torch.int16
    assert float(image.min()) == 0.0 and float(image.max()) <= 1.0
    assert np.isclose(float(image.max()), (40 + 200) / 500)
    m = mask[0].numpy().astype(bool)
    # windowed tissue (> -200 HU) is body; everything outside the body is air (0) or padding (0)
    assert m[image[0].numpy() > 0].all()
    assert (image[0].numpy()[~m] == 0).all() and (label[0].numpy()[~m] == 0).all()
    # the body was cropped to its box and padded symmetrically: the box sits in the middle
    lo = [int(a.min()) for a in np.nonzero(m)]
    hi = [int(a.max()) + 1 for a in np.nonzero(m)]
    assert hi[0] - lo[0] == 8 and hi[1] - lo[1] == 6  # 16 mm x 12 mm at 2 mm
    for d in range(3):
        assert lo[d] == (16 - (hi[d] - lo[d])) // 2
    assert set(torch.unique(label).tolist()) <= {0, 1, 2, 3}


def test_body_mask_exact_with_filled_holes(tmp_path):
    img, lab = write_phantom(tmp_path)
    cfg = PreprocessConfig(spacing=(1, 1, 4), size=(20, 16, 8))  # no resampling: exact values
    out = _run(cfg, img, lab)
    m = out["body_mask"][0].numpy()
    expected = np.zeros((20, 16, 8), dtype=np.uint8)
    expected[2:18, 2:14, 1:7] = 1  # 16 x 12 x 6 box, padded by (2, 2, 1) on each side
    np.testing.assert_array_equal(m, expected)
    image = out["image"][0].numpy()
    # the air pocket is body (holes filled) but stays air in the image
    assert ((image == 0) & (m == 1)).sum() == 4 * 4 * 2
    assert np.isclose(image[m == 1].max(), 0.48)
    assert (image[m == 0] == 0).all()


def test_pad_value_is_windowed_air_for_wide_windows(tmp_path):
    img, lab = write_phantom(tmp_path)
    cfg = PreprocessConfig(spacing=(1, 1, 4), size=(20, 16, 8), hu_window=(-1350, 150))
    out = _run(cfg, img, lab)
    air = (-1000 + 1350) / 1500
    assert np.isclose(cfg.air_value, air)
    assert np.allclose(out["image"][0, 0].numpy(), air)  # a padded slab
    assert (out["body_mask"][0, 0] == 0).all() and (out["label"][0, 0] == 0).all()


def test_resize_mode_and_label_dtype(tmp_path):
    img, lab = write_phantom(tmp_path)
    cfg = PreprocessConfig(spacing=(2, 2, 2), size=(12, 10, 6), resize_mode="resize")
    out = _run(cfg, img, lab)
    assert out["image"].shape == out["label"].shape == out["body_mask"].shape == (1, 12, 10, 6)
    assert out["label"].dtype == torch.int16
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1, 2, 3}
    # cropped to the (box-shaped) body and stretched to size: no padding, all body
    assert bool(out["body_mask"].all())


def test_augmentation_is_joint_and_deterministic(tmp_path):
    img, lab = write_phantom(tmp_path)
    cfg = PreprocessConfig(spacing=(2, 2, 2), size=(16, 16, 16))
    item = _run(cfg, img, lab)
    aug = build_augment(
        cfg, label_keys=("label",), augment={"affine_prob": 1, "intensity_prob": 1, "noise_prob": 1}
    )

    def apply(seed: int) -> dict:
        aug.set_random_state(seed)
        return aug({k: v.clone() for k, v in item.items()})

    a, b, c = apply(0), apply(0), apply(1)
    for k in ("image", "body_mask", "label"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["image"], c["image"])
    assert not torch.equal(a["body_mask"], item["body_mask"])  # the affine moved the mask too
    assert a["label"].dtype == torch.int16 and a["body_mask"].dtype == torch.uint8
    assert set(torch.unique(a["label"]).tolist()) <= {0, 1, 2, 3}
    # the full train chain is seedable through the Compose as well
    full = build_preprocess(cfg, label_keys=("label",), train=True, augment={"affine_prob": 1})
    runs = [full.set_random_state(3)({"image": str(img), "label": str(lab)}) for _ in range(2)]
    assert torch.equal(runs[0]["image"], runs[1]["image"])


def test_load_volume_meta(tmp_path):
    img, _ = write_phantom(tmp_path)
    meta = load_volume_meta(img)
    assert meta["shape"] == SHAPE and meta["spacing"] == (1.0, 1.0, 4.0)
    assert meta["orientation"] == "LPS"
    np.testing.assert_allclose(meta["affine"], LPS_AFFINE)
    with pytest.raises(DataError, match="not found"):
        load_volume_meta(tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not a volume")
    with pytest.raises(DataError, match=r"bad\.nii\.gz"):
        load_volume_meta(bad)


class CountingIdentity(MapTransform):
    """Counts how often the (expensive) deterministic chain really runs."""

    calls = 0

    def __call__(self, data):
        type(self).calls += 1
        return dict(data)


def test_cache_key_tracks_config_and_entries_are_reused(tmp_path):
    img, lab = write_phantom(tmp_path / "data")
    cfg = PreprocessConfig(spacing=(2, 2, 2), size=(16, 16, 16))
    key = cache_key(cfg, label_keys=("label",))
    assert cfg.fingerprint() in key
    assert cache_key(PreprocessConfig(spacing=(3, 2, 2), size=(16, 16, 16)), label_keys=("label",)) != key
    assert cache_key(cfg) != key  # a chain without labels produces different items
    chain = Compose([*build_preprocess(cfg, label_keys=("label",)).transforms, CountingIdentity(["image"])])
    items = [{"image": str(img), "label": str(lab)}]
    CountingIdentity.calls = 0
    first = cached_dataset(items, chain, tmp_path / "cache", key)[0]
    assert CountingIdentity.calls == 1
    assert len(list((tmp_path / "cache" / key).glob("*.pt"))) == 1
    second = cached_dataset(items, chain, tmp_path / "cache", key)[0]
    assert CountingIdentity.calls == 1  # read from disk, not recomputed
    assert torch.equal(torch.as_tensor(first["image"]), torch.as_tensor(second["image"]))
    # a rewritten input file is a new entry
    write_phantom(tmp_path / "data")
    os.utime(img, ns=(1, 1))
    cached_dataset(items, chain, tmp_path / "cache", key)[0]
    assert CountingIdentity.calls == 2
    # no cache dir: plain dataset, computed every time
    plain = cached_dataset(items, chain, None, key)
    plain[0], plain[0]
    assert CountingIdentity.calls == 4
    with pytest.raises(ConfigError, match="cache key"):
        cached_dataset(items, chain, tmp_path / "cache", "../escape")
