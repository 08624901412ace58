"""The synthetic data set: determinism, real geometry, dataset layout, ground truth and reports."""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mosmos.errors import MosmosError
from mosmos.synth import PHANTOM_ORGANS, findings_to_tags, synthesize
from mosmos.synth.cli import add_arguments, run
from mosmos.synth.datasets import SEG_DATASETS, TEST_DATASET
from mosmos.synth.pathology import FINDING_ORGANS, RESECTIONS
from mosmos.vocabulary import load_vocabulary

SHAPE = (32, 32, 24)
ARGS = {"seed": 3, "pretrain_cases": 60, "seg_cases": 3, "test_cases": 3, "shape": SHAPE, "progress": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, synthesize(out, **ARGS)


@pytest.fixture(scope="module")
def findings(data) -> dict:
    return json.loads((data[0] / "pretrain/ground_truth/findings.json").read_text())


@pytest.fixture(scope="module")
def reports(data) -> dict[str, dict]:
    with (data[0] / "pretrain/reports.csv").open(newline="") as fh:
        return {row["VolumeName"]: row for row in csv.DictReader(fh)}


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def _centroid_world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3]


def test_phantom_organs_are_vocabulary_names():
    vocab = load_vocabulary()
    assert set(PHANTOM_ORGANS) <= set(vocab.names)
    assert len(PHANTOM_ORGANS) >= 10


def test_same_seed_same_bytes_other_seed_differs(data, tmp_path):
    out, _ = data
    # made by two worker processes (the fixture by one): the bytes must not depend on it
    again = synthesize(tmp_path / "again", **ARGS, workers=2)
    assert again["tag_counts"] == data[1]["tag_counts"]
    for rel in [
        "pretrain/reports.csv",
        "pretrain/ground_truth/findings.json",
        "pretrain/images/train_0001.nii.gz",
        "pretrain/images/train_0060.nii.gz",
        "pretrain/ground_truth/labels/train_0007.nii.gz",
        "nnUNet_raw/Dataset012_KidneyB/labelsTr/KidneyB_0002.nii.gz",
        "nnUNet_raw/Dataset099_SynthTest/imagesTr/SynthTest_0001_0000.nii.gz",
        "synth.json",
    ]:
        assert (out / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    other = synthesize(
        tmp_path / "other", **{**ARGS, "seed": 4, "pretrain_cases": 2, "seg_cases": 1, "test_cases": 1}
    )
    assert other["seed"] == 4
    for rel in [
        "pretrain/images/train_0001.nii.gz",
        "nnUNet_raw/Dataset011_AbdomenA/imagesTr/AbdomenA_0001_0000.nii.gz",
    ]:
        assert (out / rel).read_bytes() != (tmp_path / "other" / rel).read_bytes()


def test_geometry_is_real_and_orientation_recoverable(data, findings):
    from monai.transforms import Compose, LoadImage, Orientation

    out, _ = data
    load = Compose([LoadImage(image_only=True, ensure_channel_first=True), Orientation(axcodes="RAS")])
    codes, checked = set(), 0
    for case_id, rec in list(findings.items())[:20]:
        image, affine = _load(out / "pretrain/images" / rec["volume"])
        assert image.dtype == np.int16 and list(image.shape) == list(SHAPE)
        zooms = nib.load(out / "pretrain/images" / rec["volume"]).header.get_zooms()
        np.testing.assert_allclose(zooms, rec["spacing"], rtol=1e-4)
        assert zooms[0] == zooms[1] != zooms[2] and max(zooms) <= 10.0  # anisotropic, square pixels
        assert "".join(nib.aff2axcodes(affine)) == rec["orientation"]
        codes.add(rec["orientation"])
        assert image.min() <= -990 and image.max() >= 300  # air around the body, bone inside
        organs = rec["organs"]
        if all(organs[o]["status"] in ("normal", "abnormal") for o in ("liver", "spleen", "urinary_bladder")):
            label = load(str(out / "pretrain/ground_truth/labels" / rec["volume"]))
            ras = label.affine.numpy()
            assert "".join(nib.aff2axcodes(ras)) == "RAS"
            lab = label[0].numpy()
            liver, spleen, bladder = (
                _centroid_world(lab == PHANTOM_ORGANS.index(o) + 1, ras)
                for o in ("liver", "spleen", "urinary_bladder")
            )
            # RAS+: x grows toward the patient's right, where the liver is; z grows superiorly.
            assert liver[0] > spleen[0] and liver[2] > bladder[2], case_id
            checked += 1
    assert len(codes) >= 2 and checked >= 3


def test_nnunet_datasets(data):
    out, summary = data
    vocab = load_vocabulary()
    labelled = []
    for ds in [*SEG_DATASETS, TEST_DATASET]:
        root = out / "nnUNet_raw" / ds.folder
        meta = json.loads((root / "dataset.json").read_text())
        assert (
            meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz" and meta["description"]
        )
        assert meta["labels"]["background"] == 0
        assert sorted(meta["labels"].values()) == list(
            range(len(meta["labels"]))
        )  # consecutive, as nnU-Net needs
        names = {vocab.lookup_label(k) for k in meta["labels"] if k != "background"}
        assert None not in names and names <= set(PHANTOM_ORGANS)
        images, labels = sorted((root / "imagesTr").iterdir()), sorted((root / "labelsTr").iterdir())
        assert meta["numTraining"] == len(images) == len(labels) == summary["counts"]["seg"].get(ds.folder, 3)
        for image_path, label_path in zip(images, labels, strict=True):
            assert image_path.name == label_path.name.replace(".nii.gz", "_0000.nii.gz")
            lab, aff = _load(label_path)
            assert lab.dtype == np.uint8
            np.testing.assert_allclose(aff, _load(image_path)[1])
            assert set(np.unique(lab)) <= set(meta["labels"].values())
            if ds is TEST_DATASET:
                assert set(np.unique(lab)) == set(meta["labels"].values())  # every organ, in every case
        if ds is TEST_DATASET:
            assert set(meta["labels"]) == {"background", *PHANTOM_ORGANS}
        else:
            labelled.append(names)
            assert names != set(PHANTOM_ORGANS)  # partial
    assert set().union(*labelled) == set(PHANTOM_ORGANS)
    assert any(a & b for i, a in enumerate(labelled) for b in labelled[i + 1 :])  # partial overlap


def test_ground_truth_matches_images_and_reports(data, findings, reports):
    out, _ = data
    ids = json.loads((out / "pretrain/ground_truth/labels.json").read_text())
    assert ids == {"background": 0, **{o: i + 1 for i, o in enumerate(PHANTOM_ORGANS)}}
    assert set(reports) == {rec["volume"] for rec in findings.values()}
    words = {
        "liver_lesion": "lesion",
        "fatty_liver": "steatosis|fatty",
        "hepatomegaly": "hepatomegaly|enlarged liver|liver is enlarged",
        "splenomegaly": "splenomegaly|enlarged spleen|spleen is enlarged",
        "renal_cyst": "cyst",
        "pancreatic_atrophy": "atroph",
        "gallstones": "stone|cholelithiasis",
        "aortic_aneurysm": "aneurysm",
        "gastric_wall_thickening": "thickening|gastric mass",
        "duodenal_diverticulum": "diverticulum",
        "ivc_thrombus": "thromb",
        "bladder_stone": "calcul|stone",
    }
    for rec in findings.values():
        lab, _ = _load(out / "pretrain/ground_truth/labels" / rec["volume"])
        text = " ".join(reports[rec["volume"]][k] for k in ("Findings_EN", "Impressions_EN")).lower()
        for organ, entry in rec["organs"].items():
            n = int((lab == ids[organ]).sum())
            if entry["status"] == "absent":
                assert n == 0 and entry["findings"] == [RESECTIONS[organ]]
            elif entry["status"] == "out_of_view":
                assert rec["in_view_fraction"][organ] < 0.3
            else:
                assert n > 0, (rec["case_id"], organ)
            for finding in entry["findings"] if entry["status"] == "abnormal" else []:
                assert re.search(words[finding], text), (rec["case_id"], finding, text)


# A minimal sentence-level reading of the report-writing rules (reports.py docstring): if the
# tags it recovers equal findings_to_tags, the contract is recoverable from the text alone.
_OUT_OF_VIEW = re.compile(r"field of view|not imaged|not included")
_ABSENT = re.compile(r"absent|not seen|removed|status post|ectomy\b")
_NEGATED = re.compile(r"\b(no|not|without)\b")
_FINDING = re.compile(
    r"lesion|cyst|steatosis|fatty|hypoattenuat|enlarged|megaly|atroph|stone|lithiasis|aneurysm"
    r"|thicken|mass|diverticul|thromb|calcul|filling defect"
)
_CATCH_ALL = re.compile(r"\b(remaining|otherwise|other)\b")


def _reference_tags(text: str, terms: list[tuple[str, str]]) -> tuple[dict[str, tuple[int, int]], bool]:
    tags: dict[str, tuple[int, int]] = {}
    catch_all = False
    for sentence in (s.lower() for s in re.split(r"(?<=\.)\s+(?=[A-Z])", text)):
        organs, taken = set(), []
        for term, organ in terms:  # longest first, so "gall bladder" is not the urinary bladder
            for m in re.finditer(rf"\b{re.escape(term)}\b", sentence):
                if not any(a < m.end() and m.start() < b for a, b in taken):
                    taken.append((m.start(), m.end()))
                    organs.add(organ)
        if not organs:
            catch_all |= bool(_CATCH_ALL.search(sentence))
            continue
        if _OUT_OF_VIEW.search(sentence):
            state = (-1, -1)
        elif _ABSENT.search(sentence):
            state = (0, -1)
        elif _FINDING.search(sentence) and not _NEGATED.search(sentence):
            state = (1, 1)
        else:
            state = (1, 0)
        for organ in organs:
            assert tags.setdefault(organ, state) == state, f"conflicting statements on {organ}: {text}"
    return tags, catch_all


def test_report_tags_are_recoverable(findings, reports):
    vocab = load_vocabulary()
    terms = sorted(
        {
            (t.lower(), o.name)
            for o in vocab.organs
            for t in (*o.synonyms, o.display, o.name.replace("_", " "))
        },
        key=lambda t: -len(t[0]),
    )
    styles = set()
    for rec in findings.values():
        row = reports[rec["volume"]]
        parsed, catch_all = _reference_tags(f"{row['Findings_EN']} {row['Impressions_EN']}", terms)
        assert set(parsed) <= set(PHANTOM_ORGANS), parsed  # never a modelled-elsewhere organ
        assert set(parsed) == set(rec["report"]["mentioned"]) and catch_all == rec["report"]["catch_all"]
        expected = findings_to_tags(rec)
        recovered = {o: parsed.get(o, (1, 0) if catch_all else (-1, -1)) for o in expected}
        assert recovered == expected, (rec["case_id"], row)
        styles.add((rec["report"]["style"], rec["report"]["structured"]))
    assert {s for s, _ in styles} == {"complete", "focused", "terse"} and (("complete", True) in styles)


def test_findings_to_tags_contract():
    case = {
        "organs": {
            "liver": {"status": "abnormal", "findings": ["fatty_liver"]},
            "spleen": {"status": "absent", "findings": ["splenectomy"]},
            "urinary_bladder": {"status": "out_of_view", "findings": []},
            "pancreas": {"status": "normal", "findings": []},
            "stomach": {"status": "normal", "findings": []},
        },
        "report": {"mentioned": ["liver", "spleen", "urinary_bladder", "pancreas"], "catch_all": False},
    }
    assert findings_to_tags(case) == {
        "liver": (1, 1),
        "spleen": (0, -1),
        "urinary_bladder": (-1, -1),
        "pancreas": (1, 0),
        "stomach": (-1, -1),
    }
    case["report"]["catch_all"] = True
    assert findings_to_tags(case)["stomach"] == (1, 0)


def test_every_finding_occurs_and_is_absent_in_a_modest_sample(findings):
    n = len(findings)
    for code, organs in FINDING_ORGANS.items():
        hits = sum(any(code in rec["organs"][o]["findings"] for o in organs) for rec in findings.values())
        assert 0 < hits < n, (code, hits)
    for code in set(RESECTIONS.values()):
        assert any(code in e["findings"] for rec in findings.values() for e in rec["organs"].values()), code
    # Every organ's abnormality tag has both classes, or its pixel-tag query gets no signal.
    for organ in PHANTOM_ORGANS:
        tags = [findings_to_tags(rec)[organ][1] for rec in findings.values()]
        assert tags.count(1) >= 3 and tags.count(0) >= 3, organ
    cuts = {rec["fov_cut"] for rec in findings.values()}
    assert cuts == {"none", "top", "bottom"}


def _lesion_contrasts(
    out: Path, findings: dict, kinds: set[str], core_extent: float = 0.6
) -> list[tuple[str, float, float]]:
    """(kind, |core - surroundings| HU, noise sigma) of each measurable lesion of ``kinds``.

    The core is the organ's voxels within ``core_extent`` of the lesion's (ellipsoidal) extent,
    the surroundings its voxels between 1.3 and 2.5 extents away from every lesion of the case.
    """
    measured = []
    for rec in findings.values():
        lesions = [les for les in rec["lesions"] if les["finding"] in kinds]
        if not lesions:
            continue
        image, affine = _load(out / "pretrain/images" / rec["volume"])
        lab, _ = _load(out / "pretrain/ground_truth/labels" / rec["volume"])
        ijk = np.indices(image.shape).reshape(3, -1)
        xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).T.reshape(*image.shape, 3)
        semis = [np.array(les.get("semi_mm", [les["radius_mm"]] * 3)) for les in lesions]
        dist = [
            np.linalg.norm((xyz - np.array(les["center_mm"])) / semi, axis=-1)
            for les, semi in zip(lesions, semis, strict=True)
        ]
        near = np.any([d < 1.3 for d in dist], axis=0)
        for d, les in zip(dist, lesions, strict=True):
            organ = lab == PHANTOM_ORGANS.index(les["organ"]) + 1
            core, ring = organ & (d < core_extent), organ & ~near & (d < 2.5)
            if core.sum() >= 2 and ring.sum() >= 5:
                contrast = abs(float(image[core].mean()) - float(image[ring].mean()))
                measured.append((les["finding"], contrast, rec["noise_sigma"]))
    return measured


def test_focal_lesions_stand_out_from_noise(data, findings):
    measured = _lesion_contrasts(data[0], findings, {"liver_lesion", "renal_cyst"})
    assert len(measured) >= 10
    for kind, contrast, sigma in measured:
        assert contrast > 3 * sigma, (kind, contrast, sigma)


def test_hollow_organ_and_caval_lesions_stand_out_from_noise(data, findings):
    kinds = {"gastric_wall_thickening", "duodenal_diverticulum", "ivc_thrombus", "bladder_stone"}
    # A wider core than for the liver lesions: a 1.6 cm stone is two voxels across at 9 mm.
    measured = _lesion_contrasts(data[0], findings, kinds, core_extent=0.8)
    for kind in kinds:  # each kind measured several times, even at this coarse test spacing
        assert sum(k == kind for k, _, _ in measured) >= 3, kind
    for kind, contrast, sigma in measured:
        assert contrast > 3 * sigma, (kind, contrast, sigma)
    # Several voxels each, even at up to 9 x 9 x 10 mm voxels.
    for rec in findings.values():
        for les in rec["lesions"]:
            if les["finding"] in kinds - {"bladder_stone"}:
                assert les["voxels"] >= 4, (rec["case_id"], les)


def test_cli_help_and_run(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mosmos synth")
    add_arguments(parser)
    # every option is in the help (tests/test_help.py); the defaults are stated there too
    assert parser.format_help().count("default") >= 5
    argv = ["--out", str(tmp_path / "d"), "--seed", "1", "--pretrain-cases", "2", "--seg-cases", "1"]
    args = parser.parse_args([*argv, "--test-cases", "1", "--shape", "24", "24", "16", "--quiet"])
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert "Dataset011_AbdomenA" in printed and "reports.csv" in printed
    summary = json.loads((tmp_path / "d" / "synth.json").read_text())
    assert summary["counts"]["pretrain"] == 2 and summary["shape"] == [24, 24, 16]
    for code, organs in FINDING_ORGANS.items():
        assert all(code in summary["findings"][o] for o in organs), code
    readme = (tmp_path / "d" / "README.txt").read_text()
    assert "ivc_thrombus" in readme and "urinary_bladder: present" in readme
    assert parser.parse_args(["--out", "x"]).pretrain_cases == 600
    assert run(args) == 0  # an earlier synth output is replaced, not refused


def test_bad_arguments_are_reported(tmp_path):
    with pytest.raises(MosmosError, match="shape"):
        synthesize(tmp_path / "a", shape=(8, 8, 8), progress=False)
    with pytest.raises(MosmosError, match="pretrain_cases"):
        synthesize(tmp_path / "b", pretrain_cases=-1, progress=False)
    with pytest.raises(MosmosError, match="workers"):
        synthesize(tmp_path / "b", pretrain_cases=1, progress=False, workers=0)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("not synth output")
    with pytest.raises(MosmosError, match="not empty"):
        synthesize(tmp_path / "c", pretrain_cases=1, seg_cases=0, test_cases=0, progress=False)
