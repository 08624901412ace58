"""The organ vocabulary: loading, label-name look-up across real datasets' spellings, user files."""

from __future__ import annotations

import pytest

from mosmos.errors import ConfigError
from mosmos.vocabulary import load_vocabulary, normalize_label_name

REQUIRED = ["liver", "spleen", "kidney_right", "kidney_left", "pancreas", "stomach", "gallbladder", "aorta"]


def test_default_vocabulary_has_required_organs_and_extras():
    vocab = load_vocabulary()
    assert set(REQUIRED) <= set(vocab.names)
    assert {"esophagus", "duodenum", "inferior_vena_cava", "urinary_bladder"} <= set(vocab.names)
    assert any(n.startswith("adrenal_gland") for n in vocab.names)
    for organ in vocab.organs:
        assert organ.synonyms, organ.name
        assert organ.label_names, organ.name


@pytest.mark.parametrize(
    ("spelling", "organ"),
    [
        ("Kidney (L)", "kidney_left"),  # AMOS-like
        ("kidney_left", "kidney_left"),  # TotalSegmentator
        ("left kidney", "kidney_left"),  # BTCV
        ("lkid", "kidney_left"),
        ("LKidney", "kidney_left"),
        ("Kidney (R)", "kidney_right"),
        ("right kidney", "kidney_right"),
        ("RKidney", "kidney_right"),
        ("Gall Bladder", "gallbladder"),
        ("gall_bladder", "gallbladder"),
        ("Postcava", "inferior_vena_cava"),  # AMOS' name for the IVC
        ("IVC", "inferior_vena_cava"),
        ("inferior vena cava", "inferior_vena_cava"),
        ("Adrenal Gland (R)", "adrenal_gland_right"),
        ("portal vein and splenic vein", "portal_vein"),
        ("Liver", "liver"),
        ("SPLEEN", "spleen"),
        ("urinary_bladder", "urinary_bladder"),
        ("Esophagus", "esophagus"),
    ],
)
def test_label_name_lookup(spelling, organ):
    assert load_vocabulary().lookup_label(spelling) == organ


def test_unknown_label_is_none_and_normalisation():
    vocab = load_vocabulary()
    assert vocab.lookup_label("tumour") is None
    assert normalize_label_name("Kidney (L)") == normalize_label_name("kidney-l") == "kidneyl"


def test_report_synonyms_include_adjectives():
    vocab = load_vocabulary()
    assert "hepatic" in vocab["liver"].synonyms
    assert "splenic" in vocab["spleen"].synonyms
    assert "pancreatic" in vocab["pancreas"].synonyms
    assert "gastric" in vocab["stomach"].synonyms
    assert "biliary" in vocab["gallbladder"].synonyms
    assert any("renal" in s for s in vocab["kidney_left"].synonyms)


def test_user_vocabulary_and_subset(tmp_path):
    path = tmp_path / "organs.yaml"
    path.write_text(
        "organs:\n  - name: heart\n    synonyms: [heart, cardiac]\n    label_names: [Heart, HRT]\n"
        "  - name: lung_left\n    display: left lung\n    label_names: [Lung (L)]\n"
    )
    vocab = load_vocabulary(path)
    assert vocab.names == ["heart", "lung_left"]
    assert vocab.lookup_label("lung_l") == "lung_left"
    assert vocab["lung_left"].display == "left lung"
    assert load_vocabulary(organs=["spleen", "liver"]).names == ["spleen", "liver"]
    with pytest.raises(KeyError, match="unknown organ"):
        load_vocabulary(organs=["brain"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("organs: []\n", "non-empty 'organs'"),
        ("organs:\n  - name: Liver\n", "snake_case"),
        ("organs:\n  - name: liver\n  - name: liver\n", "listed twice"),
        ("organs:\n  - name: a\n    label_names: [x]\n  - name: b\n    label_names: [X]\n", "maps to both"),
        ("organs:\n  - name: a\n    colour: red\n", "unknown keys"),
        ("organs: [\n", "not valid YAML"),
    ],
)
def test_bad_vocabulary_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_vocabulary(path)


def test_missing_vocabulary_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_vocabulary(tmp_path / "nope.yaml")
