"""The synthetic data set's splits: what each partially labelled dataset labels, and how it spells it.

Like BTCV, AMOS, TotalSegmentator and the Medical Segmentation Decathlon, each dataset labels its
own subset of organs with its own names and ids; organs it does not label are in the images but
marked background. Every name resolves to a canonical organ through the vocabulary's synonyms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mosmos.errors import ConfigError
from mosmos.synth.anatomy import PHANTOM_ORGANS
from mosmos.vocabulary import Vocabulary

PRETRAIN_SPLIT = 1  # random-stream code of the pretraining split


@dataclass(frozen=True)
class SegDataset:
    """One nnU-Net v2 raw dataset of the synthetic set."""

    folder: str  # DatasetNNN_Name
    prefix: str  # case identifier prefix
    split: int  # random-stream code, distinct per dataset so cases never repeat across splits
    labels: dict[str, int]  # the dataset's own label names -> ids (background excluded)
    description: str
    noise: tuple[float, float]  # noise sigma range (HU): each "site" has its own scanner

    def canonical(self, vocab: Vocabulary) -> dict[str, str]:
        """Dataset label name -> canonical organ, checked against the vocabulary and the phantom."""
        out = {}
        for name in self.labels:
            organ = vocab.lookup_label(name)
            if organ is None or organ not in PHANTOM_ORGANS:
                raise ConfigError(
                    f"{self.folder}: label {name!r} does not resolve to a phantom organ through the "
                    f"vocabulary ({vocab.source}); phantom organs are {PHANTOM_ORGANS}"
                )
            out[name] = organ
        return out

    def lookup_table(self, vocab: Vocabulary) -> np.ndarray:
        """Array mapping phantom label ids (1 + index in PHANTOM_ORGANS) to this dataset's ids."""
        lut = np.zeros(len(PHANTOM_ORGANS) + 1, dtype=np.uint8)
        for name, organ in self.canonical(vocab).items():
            lut[PHANTOM_ORGANS.index(organ) + 1] = self.labels[name]
        return lut


SEG_DATASETS: list[SegDataset] = [
    SegDataset(
        "Dataset011_AbdomenA",
        "AbdomenA",
        11,
        {
            "spleen": 1,
            "right kidney": 2,
            "left kidney": 3,
            "gallbladder": 4,
            "liver": 5,
            "stomach": 6,
            "aorta": 7,
            "inferior vena cava": 8,
            "pancreas": 9,
        },
        "BTCV-like multi-organ labels: BTCV names in BTCV order (organs the phantom lacks are omitted "
        "and ids kept consecutive, as nnU-Net requires). Duodenum and bladder are not labelled.",
        (7.0, 10.0),
    ),
    SegDataset(
        "Dataset012_KidneyB",
        "KidneyB",
        12,
        {"kidney_right": 1, "Kidney (L)": 2, "Gall Bladder": 3, "Duodenum": 4, "urinary_bladder": 5},
        "AMOS/TotalSegmentator-like spellings (mixed, as merged label sets are): kidneys, gallbladder, "
        "duodenum and urinary bladder only.",
        (9.0, 12.0),
    ),
    SegDataset(
        "Dataset013_VesselsC",
        "VesselsC",
        13,
        {"abdominal aorta": 1, "Postcava": 2, "Pancreas": 3, "Stomach": 4},
        "MSD/AMOS-like few-organ labels: aorta, inferior vena cava (AMOS 'postcava'), pancreas, stomach.",
        (10.0, 13.0),
    ),
]

TEST_DATASET = SegDataset(
    "Dataset099_SynthTest",
    "SynthTest",
    99,
    {organ: i + 1 for i, organ in enumerate(PHANTOM_ORGANS)},
    "Held-out test set, every phantom organ labelled with its canonical vocabulary name.",
    (8.0, 13.0),
)
