"""Chest CT reports (CT-RATE style) -> organ tags: laterality, negation, "both lungs", region coverage."""

from __future__ import annotations

import pytest

from mosmos.pretrain.tag_parser import TagParser
from mosmos.vocabulary import load_vocabulary

VOCAB = load_vocabulary()
PARSER = TagParser(VOCAB)
U = (-1, -1)  # unknown
N = (1, 0)  # present, normal
A = (1, 1)  # present, abnormal
R = (0, -1)  # absent
P = (1, -1)  # present, no statement on normality

LUNGS = ("lung_right", "lung_left")
ABDOMINAL = tuple(n for n in VOCAB.names if not VOCAB.in_regions(n, {"chest"}))


def _lungs(right: tuple[int, int], left: tuple[int, int]) -> dict[str, tuple[int, int]]:
    return {"lung_right": right, "lung_left": left}


CHEST_CASES = [
    # CT-RATE's translated turns of phrase
    ("Pericardial effusion-thickening was not observed.", {"heart": N, **_lungs(U, U)}),
    ("No lytic-destructive lesions were detected in the bone structures within the sections.", {"bone": N}),
    ("Trachea and both main bronchi are open.", {"trachea": N, **_lungs(U, U)}),
    ("Trachea, both main bronchi are open.", {"trachea": N}),
    ("Mediastinal main vascular structures, heart contour, size are normal.", {"heart": N, "aorta": N}),
    ("Thoracic aorta diameter is normal.", {"aorta": N}),
    ("Heart contour and size are normal.", {"heart": N}),
    (
        "Thoracic esophagus calibration was normal and no significant tumoral wall thickening was detected.",
        {"esophagus": N},
    ),
    (
        "No enlarged lymph nodes in prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary "
        "pathological dimensions were detected.",
        {"mediastinal_lymph_nodes": N},
    ),
    ("When examined in the lung parenchyma window; no nodule was detected in both lungs.", _lungs(N, N)),
    ("When examined in the lung parenchyma window;", _lungs(U, U)),
    ("No pleural effusion-thickening was detected.", _lungs(N, N)),
    ("No pneumothorax was detected.", _lungs(N, N)),
    (
        "Bilateral adrenal glands were normal and no space-occupying lesion was detected.",
        {"adrenal_gland_right": N},
    ),
    ("There are degenerative changes in the bone structures in the image.", {"bone": A}),
    ("Thyroid gland dimensions are normal.", {"thyroid": N}),
    # laterality by lobe and by side
    ("A 6 mm nodule is observed in the right upper lobe.", _lungs(A, U)),
    ("Atelectasis is seen in the left lower lobe.", _lungs(U, A)),
    ("There is consolidation in the middle lobe.", _lungs(A, U)),
    ("Linear atelectasis in the lingula.", _lungs(U, A)),
    ("A nodule was observed in the upper lobe of the right lung.", _lungs(A, U)),
    ("Ground-glass opacities in the posterior segment of the left upper lobe.", _lungs(U, A)),
    ("Right pleural effusion is present.", _lungs(A, U)),
    ("Pleural effusion is observed on the left.", _lungs(U, A)),
    ("Pleural effusion measuring 2 cm in the right hemithorax.", _lungs(A, U)),
    ("The right lung is normal, the left lung shows a mass.", _lungs(N, A)),
    ("Subsegmental atelectasis in the right lower lobe and emphysema in the left upper lobe.", _lungs(A, A)),
    ("Right-sided pleural thickening.", _lungs(A, U)),
    ("Consolidation in the right lower lobe, the left lung is clear.", _lungs(A, N)),
    ("Status post right upper lobectomy.", _lungs(A, U)),
    ("Status post left pneumonectomy.", _lungs(U, R)),
    # "both lungs", bilateral and side-less statements
    ("Minimal emphysematous changes are observed in both lungs.", _lungs(A, A)),
    ("A few millimetric nonspecific nodules were observed in both lungs.", _lungs(A, A)),
    ("Bilateral pleural effusion.", _lungs(A, A)),
    ("Atelectatic changes in the lower lobes of both lungs.", _lungs(A, A)),
    ("Centrilobular emphysema.", _lungs(A, A)),
    ("Bronchiectasis is present.", _lungs(A, A)),
    ("Mosaic attenuation pattern is observed.", _lungs(A, A)),
    ("Interlobular septal thickening is noted bilaterally.", _lungs(A, A)),
    ("Peribronchial thickening is observed.", _lungs(A, A)),
    ("Fibrotic sequelae are seen.", _lungs(A, A)),
    ("Pulmonary nodules.", _lungs(A, A)),
    ("Both lungs are clear.", _lungs(N, N)),
    ("The lung parenchyma is normal.", _lungs(N, N)),
    # negation of lung findings
    ("No consolidation or ground-glass opacity was observed in the lung parenchyma.", _lungs(N, N)),
    ("No consolidation was observed. Emphysema in the left lung.", _lungs(N, A)),
    ("No mass or infiltrative lesion was detected in both lungs.", _lungs(N, N)),
    ("Emphysema was not observed.", _lungs(N, N)),
    ("No active infiltration was detected in the lung parenchyma.", _lungs(N, N)),
    ("No nodule or mass was detected in the right lung.", _lungs(N, U)),
    ("Atelectasis cannot be excluded in the left lower lobe.", _lungs(U, A)),
    # heart, vessels and mediastinum
    ("Cardiomegaly is present.", {"heart": A}),
    ("Cardiomegaly was not observed.", {"heart": N}),
    ("Heart size increased.", {"heart": A}),
    ("Minimal pericardial effusion is observed.", {"heart": A}),
    ("Calcific atheroma plaques are observed in the aorta and coronary arteries.", {"aorta": A, "heart": A}),
    ("Coronary artery calcification is present.", {"heart": A, "aorta": U}),
    ("The ascending aorta is dilated, measuring 45 mm.", {"aorta": A}),
    ("The main pulmonary artery is enlarged.", {"pulmonary_artery": A, **_lungs(U, U)}),
    (
        "No filling defect suggesting pulmonary embolism was detected.",
        {"pulmonary_artery": N, **_lungs(U, U)},
    ),
    (
        "No lymph node was detected in the mediastinum and hilar regions in pathological size.",
        {"mediastinal_lymph_nodes": N},
    ),
    (
        "Lymph nodes with a short axis up to 14 mm are observed in the subcarinal area.",
        {"mediastinal_lymph_nodes": P},
    ),
    ("Mediastinal lymphadenopathy is observed.", {"mediastinal_lymph_nodes": A}),
    ("There is a hiatal hernia.", {"esophagus": A}),
    ("Sliding type hiatal hernia is observed at the lower end of the esophagus.", {"esophagus": A}),
    ("A 12 mm hypodense nodule in the right lobe of the thyroid gland.", {"thyroid": A, **_lungs(U, U)}),
    # bone
    ("Degenerative changes are observed in the thoracic spine.", {"bone": A}),
    ("A healed fracture of the left 7th rib.", {"bone": A, **_lungs(U, U)}),
    ("No lytic or sclerotic lesion in the ribs.", {"bone": N}),
    # abdominal organs seen in a chest CT
    (
        "No space-occupying lesion was detected in the liver that entered the cross-sectional area.",
        {"liver": N},
    ),
    ("A hypodense lesion in the liver within the sections.", {"liver": A}),
]


@pytest.mark.parametrize(("report", "expected"), CHEST_CASES, ids=[c[0][:60] for c in CHEST_CASES])
def test_chest_sentence_tags(report: str, expected: dict[str, tuple[int, int]]) -> None:
    tags = PARSER.parse(report)
    assert {organ: tags.get(organ) for organ in expected} == expected


def test_enough_chest_sentences() -> None:
    assert len(CHEST_CASES) >= 60


CT_RATE_NORMAL = (
    "Trachea, both main bronchi are open. Mediastinal main vascular structures, heart contour, size are "
    "normal. Thoracic aorta diameter is normal. Pericardial effusion-thickening was not observed. Thoracic "
    "esophagus calibration was normal and no significant tumoral wall thickening was detected. No enlarged "
    "lymph nodes in prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary pathological "
    "dimensions were detected. When examined in the lung parenchyma window; no mass or infiltrative lesion "
    "was detected in both lungs. No pleural effusion-thickening was detected. Upper abdominal organs "
    "included in the sections are normal. No lytic-destructive lesions were detected in the bone structures "
    "within the sections."
)
CT_RATE_ABNORMAL = (
    "Findings: Trachea and both main bronchi are open. Cardiomegaly is present. Calcific atheroma plaques "
    "are observed in the aorta and coronary arteries. Pericardial effusion was not observed. Lymph nodes "
    "measuring up to 15 mm in short axis are observed in the mediastinum. Sliding type hiatal hernia at the "
    "lower end of the esophagus. When examined in the lung parenchyma window; Centrilobular emphysematous "
    "changes are observed in both lungs. A 9 mm nodule was observed in the anterior segment of the right "
    "upper lobe. Atelectasis in the left lower lobe. Left pleural effusion is present. The remaining "
    "abdominal organs in the sections are unremarkable. Degenerative changes are observed in the thoracic "
    "spine.\nImpressions: Cardiomegaly. Emphysema. Right upper lobe nodule. Left pleural effusion."
)


def test_whole_ct_rate_normal_report() -> None:
    tags = PARSER.parse(CT_RATE_NORMAL)
    chest = {
        "trachea": N,
        "heart": N,
        "aorta": N,
        "esophagus": N,
        "mediastinal_lymph_nodes": N,
        "lung_right": N,
        "lung_left": N,
        "bone": N,
    }
    assert {o: tags.get(o) for o in chest} == chest
    # "Upper abdominal organs included in the sections are normal" in a chest CT: no organ is known
    # to be fully in view, so none is marked present
    assert {o: tags.get(o) for o in ABDOMINAL} == dict.fromkeys(ABDOMINAL, U)
    assert tags.get("thyroid") == U and tags.get("pulmonary_artery") == N


def test_whole_ct_rate_abnormal_report() -> None:
    tags = PARSER.parse(CT_RATE_ABNORMAL)
    expected = {
        "trachea": N,
        "heart": A,
        "aorta": A,
        "esophagus": A,
        "mediastinal_lymph_nodes": P,
        "lung_right": A,
        "lung_left": A,
        "bone": A,
        "liver": U,
        "urinary_bladder": U,
        "kidney_left": U,
    }
    assert {o: tags.get(o) for o in expected} == expected


def test_chest_report_catch_all_covers_chest_organs_only() -> None:
    tags = PARSER.parse("Mild emphysema in both lungs. Otherwise unremarkable.")
    assert tags.get("heart") == N and tags.get("trachea") == N and tags.get("bone") == N
    assert tags.get("lung_right") == A
    assert all(tags.get(o) == U for o in ABDOMINAL)
    # a chest-abdomen-pelvis CT covers both
    tags = PARSER.parse(
        "CT of the chest, abdomen and pelvis. Right upper lobe nodule. Otherwise unremarkable."
    )
    assert (
        tags.get("lung_right"),
        tags.get("lung_left"),
        tags.get("liver"),
        tags.get("urinary_bladder"),
    ) == (
        A,
        N,
        N,
        N,
    )


def test_abdominal_report_keeps_chest_organs_unknown() -> None:
    tags = PARSER.parse(
        "Bibasilar atelectasis. No lymphadenopathy. Hepatic steatosis. Otherwise unremarkable."
    )
    assert tags.get("liver") == A and tags.get("spleen") == N and tags.get("kidney_left") == N
    # an abdominal CT shows the lung bases only: implied lung findings and catch-alls stay off the chest
    assert tags.get("lung_right") == U and tags.get("mediastinal_lymph_nodes") == U and tags.get("heart") == U


def test_coverage() -> None:
    assert PARSER.coverage("Both lungs are clear.") == {"chest"}
    assert PARSER.coverage("The liver is enlarged.") == {"abdomen", "pelvis"}
    assert PARSER.coverage("CT chest, abdomen and pelvis: both lungs are clear.") == {
        "chest",
        "abdomen",
        "pelvis",
    }
