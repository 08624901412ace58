"""Report -> organ tags: a table of tricky sentences, the matrix/frequency helpers and ``mosmos tags``."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest

from mosmos.errors import DataError
from mosmos.pretrain import tags_cli
from mosmos.pretrain.tag_parser import ReportTags, TagParser
from mosmos.pretrain.tags import parse_report, tag_frequencies, tag_matrix
from mosmos.synth import findings_to_tags, synthesize
from mosmos.table import read_report_table
from mosmos.vocabulary import Vocabulary, load_vocabulary

VOCAB = load_vocabulary()
PARSER = TagParser(VOCAB)
ALL = tuple(VOCAB.names)
# what an abdominal CT covers: an abdominal report's catch-all never reaches the chest organs
ABDOMINAL = tuple(n for n in ALL if VOCAB.in_regions(n, {"abdomen", "pelvis"}))
CHEST_ONLY = tuple(n for n in ALL if n not in ABDOMINAL)
U = (-1, -1)  # unknown
N = (1, 0)  # present, normal
A = (1, 1)  # present, abnormal
R = (0, -1)  # absent (resected, congenitally missing)

KIDNEYS = ("kidney_right", "kidney_left")
ADRENALS = ("adrenal_gland_right", "adrenal_gland_left")


def _both(organs: tuple[str, ...], tags: tuple[int, int]) -> dict[str, tuple[int, int]]:
    return dict.fromkeys(organs, tags)


CASES = [
    # negated findings leave a visible, normal organ
    ("No focal hepatic lesion.", {"liver": N, "spleen": U}),
    ("The spleen is normal in size without focal abnormality.", {"spleen": N}),
    ("There is no evidence of hydronephrosis or renal mass.", _both(KIDNEYS, N)),
    ("No renal calculi or hydronephrosis.", _both(KIDNEYS, N)),
    ("Splenomegaly is not present.", {"spleen": N}),
    ("Hepatic lesions are not identified.", {"liver": N}),
    ("No hepatic or splenic lesion.", {"liver": N, "spleen": N}),
    ("Neither hepatomegaly nor splenomegaly.", {"liver": N, "spleen": N}),
    (
        "No abnormality of the liver, spleen, pancreas or adrenal glands.",
        {"liver": N, "pancreas": N, **_both(ADRENALS, N)},
    ),
    ("The gallbladder wall is not thickened and there are no gallstones.", {"gallbladder": N}),
    ("The common bile duct is non-dilated. Gallstones are not seen.", {"gallbladder": N}),
    ("The abdominal aorta is of normal caliber without aneurysm.", {"aorta": N}),
    # abnormal findings, and abnormal beating normal
    ("Hepatomegaly with diffuse fatty infiltration.", {"liver": A}),
    ("No hepatomegaly. A 2 cm hypodense hepatic lesion.", {"liver": A}),
    ("The liver is not enlarged but contains a 2.5 cm cyst.", {"liver": A}),
    (
        "A 2.5 cm cyst in the left kidney. The kidneys are otherwise normal.",
        {"kidney_left": A, "kidney_right": N},
    ),
    ("The liver is enlarged and the spleen is normal.", {"liver": A, "spleen": N}),
    ("No focal lesion in the liver, and the spleen is enlarged.", {"liver": N, "spleen": A}),
    ("The pancreas is atrophic; no splenomegaly.", {"pancreas": A, "spleen": N}),
    ("Atherosclerotic calcifications of the abdominal aorta with a 3.1 cm aneurysm.", {"aorta": A}),
    ("The gall-bladder is distended with wall thickening and cholelithiasis.", {"gallbladder": A}),
    ("Cholelithiasis without cholecystitis.", {"gallbladder": A}),
    ("Liver: steatosis. Spleen: normal.", {"liver": A, "spleen": N}),
    # double negation and pseudo-negation
    ("A small hepatic lesion cannot be excluded.", {"liver": A}),
    ("The spleen is not unremarkable.", {"spleen": A}),
    ("No change in the size of the right renal cyst.", {"kidney_right": A, "kidney_left": U}),
    # laterality
    ("Right renal cyst.", {"kidney_right": A, "kidney_left": U}),
    ("Bilateral renal cysts.", _both(KIDNEYS, A)),
    ("Simple cysts in both kidneys.", _both(KIDNEYS, A)),
    ("The left kidney is atrophic.", {"kidney_left": A, "kidney_right": U}),
    (
        "The right kidney is normal, the left kidney shows hydronephrosis.",
        {"kidney_right": N, "kidney_left": A},
    ),
    ("Renal cyst on the left.", {"kidney_left": A, "kidney_right": U}),
    (
        "Left adrenal nodule measuring 1.5 cm, likely adenoma.",
        {"adrenal_gland_left": A, "adrenal_gland_right": U},
    ),
    ("The adrenal glands are unremarkable.", _both(ADRENALS, N)),
    # resection and absence
    ("Status post splenectomy.", {"spleen": R}),
    ("The spleen is not seen; splenectomy.", {"spleen": R}),
    ("Status post left nephrectomy. The right kidney is normal.", {"kidney_left": R, "kidney_right": N}),
    ("Status post right nephrectomy.", {"kidney_right": R, "kidney_left": U}),
    ("Cholecystectomy clips; the gallbladder is not seen.", {"gallbladder": R}),
    ("The gallbladder is surgically absent.", {"gallbladder": R}),
    ("No gallbladder is identified.", {"gallbladder": R}),
    ("The uterus has been removed.", {"prostate_uterus": R}),
    ("Congenitally absent left kidney.", {"kidney_left": R, "kidney_right": U}),
    ("Status post distal pancreatectomy.", {"pancreas": A}),
    ("Status post nephrectomy.", _both(KIDNEYS, U)),
    ("Status post nephrectomy. Otherwise unremarkable.", {**_both(KIDNEYS, U), "liver": N}),
    ("Status post splenectomy. The spleen is normal.", {"spleen": R}),
    # field of view
    ("The liver dome is not imaged.", {"liver": U}),
    ("The urinary bladder is not included in the field of view.", {"urinary_bladder": U}),
    ("The lower poles of both kidneys are outside the field of view.", _both(KIDNEYS, U)),
    ("The liver is partially imaged and demonstrates a 1.2 cm cyst.", {"liver": A}),
    (
        "The pelvis is not imaged; the bladder is outside the field of view. Otherwise unremarkable.",
        {"urinary_bladder": U, "spleen": N},
    ),
    # catch-all sentences fill only organs the report says nothing else about
    (
        "The remaining abdominal organs are unremarkable.",
        {**dict.fromkeys(ABDOMINAL, N), **dict.fromkeys(CHEST_ONLY, U)},
    ),
    ("Diffuse hepatic steatosis. Otherwise unremarkable.", {"liver": A, "spleen": N, "aorta": N}),
    (
        "Status post cholecystectomy. Remaining visualized organs are within normal limits.",
        {"gallbladder": R, "colon": N},
    ),
    ("Right renal cyst. No other abnormality.", {"kidney_right": A, "kidney_left": N}),
    ("Apart from a renal cyst, the remaining organs are unremarkable.", {**_both(KIDNEYS, A), "spleen": N}),
    ("The liver is otherwise unremarkable.", {"liver": N, "spleen": U}),
    ("The liver is enlarged. It is otherwise unremarkable.", {"liver": A, "spleen": U}),
    # coordination, decimals, synonyms
    ("The spleen and pancreas are unremarkable.", {"spleen": N, "pancreas": N, "liver": U}),
    ("The liver, spleen, and pancreas are normal.", {"liver": N, "spleen": N, "pancreas": N}),
    (
        "A 2.5 cm hypodense lesion in segment 7 of the liver. The spleen measures 10.2 cm.",
        {"liver": A, "spleen": (1, -1)},
    ),
    ("The gall bladder contains stones.", {"gallbladder": A, "urinary_bladder": U}),
    ("The bladder is distended.", {"urinary_bladder": A, "gallbladder": U}),
    ("The oesophagus is normal.", {"esophagus": N}),
    ("The IVC is patent.", {"inferior_vena_cava": N}),
    ("The superior vena cava is normal.", {"inferior_vena_cava": U}),
    ("Wall thickening of the splenic flexure.", {"colon": A, "spleen": U}),
    ("The portal and splenic veins are patent.", {"portal_vein": N, "spleen": U}),
    ("FINDINGS: Mild splenomegaly.\nIMPRESSION: Splenomegaly.", {"spleen": A}),
    ("", dict.fromkeys(ALL, U)),
]


@pytest.mark.parametrize(("report", "expected"), CASES, ids=[c[0][:60] or "<empty>" for c in CASES])
def test_report_tags(report: str, expected: dict[str, tuple[int, int]]) -> None:
    tags = PARSER.parse(report)
    got = {organ: tags.get(organ) for organ in expected}
    assert got == expected


def test_parse_report_uses_the_vocabulary_order() -> None:
    vocab = VOCAB.subset(["spleen", "liver"])
    tags = parse_report("Status post splenectomy. Hepatic steatosis.", vocab)
    assert isinstance(tags, ReportTags)
    assert tags.present.dtype == np.int8 and tags.present.shape == (2,)
    np.testing.assert_array_equal(tags.as_array(), np.array([[0, -1], [1, 1]], dtype=np.int8))
    assert tags.as_array().dtype == np.int8


def test_custom_vocabulary_pairs_and_synonyms() -> None:
    vocab = Vocabulary.from_dict(
        {
            "organs": [
                {
                    "name": "lung_right",
                    "display": "right lung",
                    "synonyms": ["right lung", "right pulmonary"],
                },
                {"name": "lung_left", "display": "left lung", "synonyms": ["left lung", "left pulmonary"]},
                {"name": "heart", "synonyms": ["heart", "cardiac", "cardiomegaly"]},
            ]
        }
    )
    tags = TagParser(vocab).parse("Bilateral pulmonary nodules. Cardiomegaly is not present.")
    np.testing.assert_array_equal(tags.as_array(), [[1, 1], [1, 1], [1, 0]])
    tags = TagParser(vocab).parse("The right lung is clear, the left lung shows a mass.")
    assert (tags.get("lung_right"), tags.get("lung_left"), tags.get("heart")) == (N, A, U)


def test_tag_matrix_and_frequencies() -> None:
    reports = [
        "Status post splenectomy. Hepatic cyst.",
        "The spleen is normal. The liver dome is not imaged.",
        "",
    ]
    matrix = tag_matrix(reports, VOCAB)
    assert matrix.shape == (3, len(VOCAB), 2) and matrix.dtype == np.int8
    np.testing.assert_array_equal(matrix[0], PARSER.parse(reports[0]).as_array())
    rows = tag_frequencies(matrix, VOCAB)
    assert [r["organ"] for r in rows] == VOCAB.names
    spleen, liver = rows[VOCAB.index("spleen")], rows[VOCAB.index("liver")]
    assert spleen == {
        "organ": "spleen",
        "n": 3,
        "present": 1,
        "absent": 1,
        "present_unknown": 1,
        "abnormal": 0,
        "normal": 1,
        "abnormal_unknown": 2,
    }
    assert (liver["present"], liver["present_unknown"], liver["abnormal"]) == (1, 2, 1)
    for r in rows:
        assert r["present"] + r["absent"] + r["present_unknown"] == 3
        assert r["abnormal"] + r["normal"] + r["abnormal_unknown"] == 3
    assert tag_matrix([], VOCAB).shape == (0, len(VOCAB), 2)
    with pytest.raises(ValueError, match="shape"):
        tag_frequencies(np.zeros((2, 3, 2)), VOCAB)


def _cli_args(table, **kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tags_cli.add_arguments(parser)
    argv = [str(table)]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", *([value] if isinstance(value, str) else value)]
    return parser.parse_args(argv)


def _write_table(path, rows) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["VolumeName", "Findings_EN", "Impressions_EN"])
        writer.writerows(rows)


def test_cli_prints_frequencies_and_writes_tags(tmp_path, capsys) -> None:
    table = tmp_path / "reports.csv"
    _write_table(
        table,
        [
            ["a.nii.gz", "Status post splenectomy. The liver is enlarged.", "Hepatomegaly."],
            ["b.nii.gz", "The spleen is normal. No focal hepatic lesion.", "Otherwise unremarkable."],
            ["c.nii.gz", "Right renal cyst.", ""],
        ],
    )
    out = tmp_path / "tags.csv"
    assert tags_cli.run(_cli_args(table, output=str(out))) == 0
    captured = capsys.readouterr()
    assert "3 reports" in captured.out
    liver_line = next(line for line in captured.out.splitlines() if line.startswith("liver"))
    assert "2 (66.7%)" in liver_line and "1 (33.3%)" in liver_line
    assert "warning: liver: 'present' is always 'present' (2 known)" in captured.err
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["VolumeName"] for r in rows] == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert (rows[0]["spleen_present"], rows[0]["liver_abnormal"], rows[2]["kidney_right_abnormal"]) == (
        "0",
        "1",
        "1",
    )
    assert rows[2]["liver_present"] == "-1"


def test_cli_errors_name_the_file_and_columns(tmp_path) -> None:
    table = tmp_path / "reports.csv"
    _write_table(table, [["a.nii.gz", "Normal liver.", ""]])
    with pytest.raises(DataError, match=r"Report_Text.*VolumeName"):
        tags_cli.run(_cli_args(table, report_columns=["Report_Text"]))
    with pytest.raises(DataError, match=r"missing\.csv"):
        tags_cli.run(_cli_args(tmp_path / "missing.csv"))


def test_parser_recovers_the_synthetic_report_tags(tmp_path) -> None:
    """Reports written by ``mosmos synth`` follow the tag contract; the parser must read it back."""
    synthesize(
        tmp_path, seed=3, pretrain_cases=60, seg_cases=1, test_cases=1, shape=(32, 32, 24), progress=False
    )
    records = read_report_table(tmp_path / "pretrain" / "reports.csv", check_images=False)
    truth = json.loads((tmp_path / "pretrain" / "ground_truth" / "findings.json").read_text())
    assert len(records) == 60
    pairs, wrong = 0, []
    for record in records:
        tags = PARSER.parse(record["report"])
        for organ, expected in findings_to_tags(truth[record["case_id"]]).items():
            pairs += 1
            if tags.get(organ) != tuple(expected):
                wrong.append((record["case_id"], organ, tags.get(organ), expected, record["report"]))
    assert pairs >= 60 * 8
    assert len(wrong) <= 0.01 * pairs, "\n".join(map(str, wrong[:10]))


def test_cli_reports_known_shares_and_warns_when_most_tags_are_unknown(tmp_path, capsys) -> None:
    table = tmp_path / "reports.csv"
    _write_table(
        table,
        [
            ["a.nii.gz", "The liver is enlarged.", ""],
            ["b.nii.gz", "The liver is normal. The spleen is normal.", ""],
        ],
    )
    assert tags_cli.run(_cli_args(table)) == 0
    captured = capsys.readouterr()
    liver = next(line for line in captured.out.splitlines() if line.startswith("liver")).split()
    spleen = next(line for line in captured.out.splitlines() if line.startswith("spleen")).split()
    assert liver[-2:] == ["100%", "100%"] and spleen[-2:] == ["50%", "50%"]  # known present, abnormal
    assert "warning: most tags are unknown" in captured.err
    never = next(line for line in captured.err.splitlines() if "never mentioned" in line)
    assert "pancreas" in never and "liver" not in never and "spleen" not in never
