"""Inference in the input's own geometry: a flipped, anisotropic affine survives the round trip exactly."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from mosmos.errors import ConfigError
from mosmos.finetune.inference import (
    ModelSpec,
    Predictor,
    decode_probabilities,
    labels_json,
    organ_probabilities,
    save_label_map,
)
from mosmos.finetune.predict import case_names, safe_output_path
from mosmos.transforms import PreprocessConfig

ORGAN_HU = {1: 100.0, 2: 250.0}  # organ id -> HU; body is 0 HU, air -1000


class IntensityOracle(nn.Module):
    """Logits that recognise each organ by its windowed intensity (no learning: tests geometry only)."""

    task_conditioned = False

    def __init__(self, window=(-200.0, 300.0)):
        super().__init__()
        lo, hi = window
        self.centres = [(hu - lo) / (hi - lo) for hu in ORGAN_HU.values()]
        self.calls = []

    def forward(self, x, task=None, mask=None):
        self.calls.append((tuple(x.shape), None if task is None else task.tolist(), mask is not None))
        return torch.cat([40.0 * (0.1 - (x - c).abs()) for c in self.centres], dim=1)


def _phantom(tmp_path, affine):
    shape = (40, 30, 20)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[4:36, 3:27, 2:18] = 0.0  # body
    label = np.zeros(shape, dtype=np.uint8)
    label[8:20, 6:16, 4:12] = 1
    label[24:33, 14:24, 9:16] = 2
    for k, v in ORGAN_HU.items():
        hu[label == k] = v
    img_path, lab_path = tmp_path / "case_0000.nii.gz", tmp_path / "case_label.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), img_path)
    nib.save(nib.Nifti1Image(label, affine), lab_path)
    return img_path, label


def _spec(tasks=1, strategy="masked"):
    pre = PreprocessConfig(spacing=(3.0, 3.0, 4.0), size=(16, 16, 16), resize_mode="pad")
    return ModelSpec(
        name="oracle",
        encoder="none",
        encoder_kwargs={},
        decoder={},
        attention_head=None,
        organs=["liver", "spleen"],
        tasks=[{"name": f"T{i}", "organs": ["liver", "spleen"]} for i in range(tasks)],
        organ_task={"liver": 0, "spleen": tasks - 1},
        strategy=strategy,
        preprocess=pre.to_dict(),
        extra={},
    )


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([-2.0, 3.0, -5.0, 1.0]),  # flipped x and z, anisotropic
        np.array([[0, 0, 5.0, 10], [-2.0, 0, 0, -4], [0, 3.0, 0, 7], [0, 0, 0, 1]]),  # permuted + flipped
    ],
)
def test_prediction_has_the_inputs_shape_and_affine_and_matches_the_label(tmp_path, affine):
    img_path, label = _phantom(tmp_path, affine)
    predictor = Predictor(IntensityOracle(), _spec(), "cpu", overlap=0.25, sw_batch_size=2)
    probs, _ = predictor.probabilities(img_path)
    assert tuple(probs.shape) == (2, *label.shape)
    pred = decode_probabilities(probs, "masked")
    out = tmp_path / "out" / "case.nii.gz"
    save_label_map(pred, img_path, out)
    written = nib.load(out)
    assert written.shape == label.shape
    np.testing.assert_allclose(written.affine, nib.load(img_path).affine)
    assert written.get_data_dtype() == np.uint8
    saved = np.asarray(written.dataobj)
    for k in (1, 2):
        # resampled to 3 x 3 x 4 mm and back: boundary voxels may move, the organs must not
        assert _dice(saved == k, label == k) > 0.85, k
    # the windows really ran in the resampled space, with the body mask passed along
    assert all(shape[2:] == (16, 16, 16) and has_mask for shape, _, has_mask in predictor.model.calls)


def test_without_a_task_each_organ_comes_from_a_task_that_labels_it(tmp_path):
    img_path, _ = _phantom(tmp_path, np.diag([2.0, 2.0, 3.0, 1.0]))
    model = IntensityOracle()
    model.task_conditioned = True
    predictor = Predictor(model, _spec(tasks=2), "cpu")
    predictor.probabilities(img_path)
    assert {tuple(set(t)) for _, t, _ in model.calls} == {(0,), (1,)}  # one pass per task needed
    model.calls.clear()
    predictor.probabilities(img_path, task=1)
    assert {tuple(set(t)) for _, t, _ in model.calls} == {(1,)}


class TaskOracle(IntensityOracle):
    """The oracle's logits shifted by a per-task offset: each task's pass gives different numbers."""

    task_conditioned = True

    def forward(self, x, task=None, mask=None):
        offset = torch.tensor([-1.5, 0.7])[task].view(-1, 1, 1, 1, 1)
        return super().forward(x, task, mask) + offset


@pytest.mark.parametrize("strategy", ["masked", "marginal"])
def test_each_organ_has_the_probabilities_of_its_tasks_pass(tmp_path, strategy):
    from monai.inferers import sliding_window_inference

    img_path, _ = _phantom(tmp_path, np.diag([2.0, 2.0, 3.0, 1.0]))
    spec = _spec(tasks=2, strategy=strategy)  # liver read from task 0, spleen from task 1
    predictor = Predictor(TaskOracle(), spec, "cpu", overlap=0.25, sw_batch_size=3)
    _, x = predictor.preprocess(img_path)
    reference = []
    for t in (0, 1):  # each task's pass on its own, channel t from pass t
        logits = sliding_window_inference(
            x,
            (16, 16, 16),
            2,
            lambda w, t=t: predictor.model(w[:, :1], torch.full((len(w),), t), w[:, 1:2]),
            overlap=0.25,
            mode="gaussian",
        )
        reference.append(organ_probabilities(torch.as_tensor(logits), strategy)[0, t])
    torch.testing.assert_close(predictor.window_probabilities(x), torch.stack(reference))
    assert predictor.window_probabilities(x, task=1)[0].sub(reference[0]).abs().max() > 0.1
    with pytest.raises(ConfigError, match="'average'"):
        Predictor(TaskOracle(), spec, mode="average")


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"T0.*T1"):
        _spec(tasks=2).task_index("nope")


def test_decode_and_probabilities_on_known_values():
    logits = torch.tensor([[[2.0, -3.0, -0.5]], [[1.0, 4.0, -2.0]]])[None]  # [1, 2, 1, 3]
    masked = organ_probabilities(logits, "masked")[0]
    np.testing.assert_allclose(masked.numpy(), 1 / (1 + np.exp(-logits[0].numpy())), rtol=1e-6)
    assert decode_probabilities(masked, "masked").tolist() == [[1, 2, 0]]
    marginal = organ_probabilities(logits, "marginal")[0]
    full = np.concatenate([np.zeros((1, 1, 3)), logits[0].numpy()])
    expected = np.exp(full) / np.exp(full).sum(0)
    np.testing.assert_allclose(marginal.numpy(), expected[1:], rtol=1e-5)
    assert decode_probabilities(marginal, "marginal").tolist() == [[1, 2, 0]]


def test_output_paths_never_escape_the_output_folder(tmp_path):
    assert safe_output_path(tmp_path, "case.nii.gz") == (tmp_path / "case.nii.gz").resolve()
    for bad in ("../evil.nii.gz", "/etc/passwd", "..", "a/../../b.nii.gz", ""):
        with pytest.raises(ConfigError, match="outside --output"):
            safe_output_path(tmp_path, bad)
    assert case_names([tmp_path / "AbdomenA_003_0000.nii.gz"]) == [("AbdomenA_003", ".nii.gz")]
    assert case_names([tmp_path / "scan.nii"]) == [("scan", ".nii")]


def test_labels_json_lists_ids_in_organ_order():
    assert labels_json(["liver", "spleen"]) == {"0": "background", "1": "liver", "2": "spleen"}
    json.dumps(labels_json(["liver"]))
