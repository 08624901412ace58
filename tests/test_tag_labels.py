"""data.labels_table: CT-RATE's multi-abnormality labels as organ tags (mosmos.pretrain.tag_labels)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from mosmos.errors import ConfigError, DataError
from mosmos.pretrain.tag_labels import CT_RATE_LABEL_ORGANS, apply_labels, label_organs, read_labels_table
from mosmos.pretrain.tags import tag_matrix
from mosmos.vocabulary import load_vocabulary
from tests.test_transforms import write_phantom

VOCAB = load_vocabulary()
CT_RATE_LABELS = [
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
]


def _write(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _labels_row(name, positives=()):
    return [name, *(1 if label in positives else 0 for label in CT_RATE_LABELS)]


def test_every_ct_rate_label_is_tied_to_vocabulary_organs():
    assert list(CT_RATE_LABEL_ORGANS) == CT_RATE_LABELS
    for label, organs in CT_RATE_LABEL_ORGANS.items():
        assert all(o in VOCAB for o in organs), label
    assert CT_RATE_LABEL_ORGANS["Lung nodule"] == ("lung_right", "lung_left")
    assert CT_RATE_LABEL_ORGANS["Medical material"] == ()


def _tags(reports, case_ids, positives):
    table = {
        c: {label: int(label in p) for label in CT_RATE_LABELS}
        for c, p in zip(case_ids, positives, strict=True)
    }
    parsed = tag_matrix(reports, VOCAB)
    return parsed, apply_labels(parsed, case_ids, table, CT_RATE_LABEL_ORGANS, VOCAB)


def _get(tags, row, organ):
    return tuple(int(v) for v in tags[row, VOCAB.index(organ)])


def test_positive_labels_mark_their_organs_and_respect_the_parsed_side():
    reports = [
        "Trachea and both main bronchi are open. The heart is normal.",  # labels add cardiomegaly
        "A 6 mm nodule in the right upper lobe. The left lung is clear.",  # side named by the report
        "Both lungs are clear. Heart contour and size are normal.",  # side-less label: both lungs
        "Status post left pneumonectomy.",  # the absent lung is left out
        "Trachea is open.",
    ]
    cases = ["a", "b", "c", "d", "e"]
    positives = [{"Cardiomegaly"}, {"Lung nodule"}, {"Emphysema"}, {"Atelectasis"}, {"Medical material"}]
    parsed, tags = _tags(reports, cases, positives)
    assert _get(parsed, 0, "heart") == (1, 0) and _get(tags, 0, "heart") == (1, 1)
    assert _get(tags, 1, "lung_right") == (1, 1) and _get(tags, 1, "lung_left") == (1, 0)
    assert _get(tags, 2, "lung_right") == (1, 1) and _get(tags, 2, "lung_left") == (1, 1)
    assert _get(tags, 2, "heart") == (1, 0)  # a negative label (cardiomegaly 0) changes nothing
    assert _get(tags, 3, "lung_left") == (0, -1) and _get(tags, 3, "lung_right") == (1, 1)
    np.testing.assert_array_equal(tags[4], parsed[4])  # medical material: no organ
    # everything but the labelled organs is as parsed
    changed = np.argwhere((tags != parsed).any(axis=2))
    assert {(int(r), VOCAB.names[int(o)]) for r, o in changed} == {
        (0, "heart"),
        (2, "lung_right"),
        (2, "lung_left"),
        (3, "lung_right"),
    }


def test_apply_labels_skips_organs_outside_a_vocabulary_subset():
    vocab = VOCAB.subset(["liver", "heart"])
    table = {"a": {"Lung nodule": 1, "Cardiomegaly": 1}}
    tags = apply_labels(np.full((1, 2, 2), -1, np.int8), ["a"], table, CT_RATE_LABEL_ORGANS, vocab)
    np.testing.assert_array_equal(tags[0], [[-1, -1], [1, 1]])
    with pytest.raises(DataError, match=r"labels\.csv: 1 case\(s\) of data.table have no row.*'b'"):
        apply_labels(np.zeros((1, 2, 2), np.int8), ["b"], table, CT_RATE_LABEL_ORGANS, vocab, "labels.csv")


def test_read_labels_table_keys_by_volume_stem(tmp_path):
    path = _write(
        tmp_path / "labels.csv",
        ["VolumeName", *CT_RATE_LABELS],
        [_labels_row("train_1_a_1.nii.gz", {"Emphysema"}), _labels_row("train_2_a_1.nii.gz")],
    )
    table = read_labels_table(path, "VolumeName", CT_RATE_LABEL_ORGANS)
    assert set(table) == {"train_1_a_1", "train_2_a_1"}
    assert table["train_1_a_1"]["Emphysema"] == 1 and sum(table["train_2_a_1"].values()) == 0


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (["Volume", "Emphysema"], [["a.nii.gz", "1"]], r"labels\.csv has no key column 'VolumeName'.*Volume"),
        (
            ["VolumeName", "Lung tumour"],
            [["a.nii.gz", "1"]],
            r"labels\.csv: column\(s\) \['Lung tumour'\].*label_organs",
        ),
        (
            ["VolumeName", "Emphysema"],
            [["a.nii.gz", "2"]],
            r"labels\.csv line 2 \(a\.nii\.gz\): Emphysema='2' is not 0 or 1",
        ),
        (["VolumeName", "Emphysema"], [["a.nii.gz", ""]], r"Emphysema='' is not 0 or 1"),
        (
            ["VolumeName", "Emphysema"],
            [["a.nii.gz", "1"], ["a.nii.gz", "0"]],
            r"line 3: 'a\.nii\.gz' is listed twice",
        ),
        (["VolumeName", "Emphysema"], [["", "1"]], r"line 2: empty 'VolumeName'"),
        (["VolumeName"], [["a.nii.gz"]], r"no label column"),
    ],
)
def test_bad_labels_tables_name_the_file(tmp_path, header, rows, message):
    path = _write(tmp_path / "labels.csv", header, rows)
    with pytest.raises(DataError, match=message):
        read_labels_table(path, "VolumeName", CT_RATE_LABEL_ORGANS)


def test_missing_labels_table_and_label_organ_overrides(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv not found"):
        read_labels_table(tmp_path / "nope.csv", "VolumeName", CT_RATE_LABEL_ORGANS)
    organs = label_organs({"Thyroid nodule": ["thyroid"], "Medical material": "heart"}, VOCAB)
    assert organs["Thyroid nodule"] == ("thyroid",) and organs["Medical material"] == ("heart",)
    with pytest.raises(
        ConfigError, match=r"data\.label_organs\.Rib fracture: \['ribs'\] not in the vocabulary"
    ):
        label_organs({"Rib fracture": ["ribs"]}, VOCAB)


def test_build_datasets_adds_labels_and_shuffled_reports_take_their_labels(tmp_path):
    from mosmos.config import load_config
    from mosmos.pretrain.config import PretrainConfig
    from mosmos.pretrain.data import build_datasets

    names = []
    for i in range(3):
        image, _ = write_phantom(tmp_path / "vol", f"case{i}")
        names.append(image.name)
    reports = _write(
        tmp_path / "reports.csv",
        ["VolumeName", "Findings_EN", "Impressions_EN"],
        [[n, "Both lungs are clear. Heart contour and size are normal.", ""] for n in names],
    )
    labels = _write(
        tmp_path / "labels.csv",
        ["VolumeName", *CT_RATE_LABELS],
        [_labels_row(names[0], {"Cardiomegaly"}), _labels_row(names[1]), _labels_row(names[2])],
    )
    base = [
        f"output_dir={tmp_path / 'run'}",
        f"data.table={reports}",
        f"data.image_root={tmp_path / 'vol'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.labels_table={labels}",
        "data.spacing=[2,2,2]",
        "data.size=[16,16,16]",
        "data.val_fraction=0.34",
        "data.check=none",
    ]
    heart = VOCAB.index("heart")

    def heart_tags(extra):
        data = build_datasets(load_config(PretrainConfig, None, [*base, *extra]), VOCAB)
        out = {}
        for ds in (data.train, data.val):
            for record, tag in zip(ds.records, ds.tags, strict=True):
                out[record["case_id"]] = tuple(int(v) for v in tag[heart])
        return out

    assert heart_tags([]) == {"case0": (1, 1), "case1": (1, 0), "case2": (1, 0)}
    shuffled = heart_tags(["data.shuffle_reports=true"])
    assert shuffled["case0"] == (1, 0) and sorted(shuffled.values()) == [(1, 0), (1, 0), (1, 1)]
    missing = _write(tmp_path / "short.csv", ["VolumeName", *CT_RATE_LABELS], [_labels_row(names[0])])
    with pytest.raises(DataError, match=r"short\.csv: 2 case\(s\) of data.table have no row"):
        build_datasets(load_config(PretrainConfig, None, [*base, f"data.labels_table={missing}"]), VOCAB)
