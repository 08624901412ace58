"""Output-channel layouts of a stage 2 network (``model.output_channels``) and how a
``dataset_class`` network's channels become vocabulary organs.

``organ`` (the default): one channel per vocabulary organ that some dataset labels; every dataset's
label for an organ trains the same channel.

``dataset_class`` (MultiTalent, Ulrich et al., MICCAI 2023, arXiv:2303.14444): one sigmoid channel
per (dataset, organ it labels), so two datasets that label the kidneys train two kidney channels and
label definitions that disagree (a liver with or without its tumours) stay apart. Channels are
ordered by dataset (``data.datasets`` order), then by vocabulary organ. A training case's valid
channels are its own dataset's; the loss (:class:`~mosmos.models.seg_losses.MultiTalentLoss`) sees
only those.

Merging into organs (:func:`merge_channels`), at validation, ``mosmos evaluate`` and
``mosmos predict``, so label maps, ``dataset.json`` and Dice tables stay per vocabulary organ:

* with a task (validation on a dataset's cases, ``--task NAME``): each organ that task labels is
  that task's own channel. MultiTalent scores every dataset on its own channels and writes every
  channel separately (its ``predict_MultiTalent.py``); it never mixes two datasets' definitions of a
  class.
* otherwise, and for the organs the task does not label: the mean of the sigmoid probabilities of
  every channel that labels the organ. MultiTalent's code has no cross-dataset merge; the mean is
  the rule here because the channels are estimates of the same structure under slightly different
  definitions: their mean keeps a voxel that most of them call organ, where the maximum would
  take the union of every channel's false positives and the most generous definition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "OUTPUT_CHANNELS",
    "channel_lut",
    "dataset_class_channels",
    "merge_channels",
    "valid_channels",
]

OUTPUT_CHANNELS = ("organ", "dataset_class")


def dataset_class_channels(
    task_organs: Sequence[Sequence[str]], organs: Sequence[str]
) -> list[tuple[int, str]]:
    """The ``dataset_class`` layout: ``(task index, organ)`` per output channel, by task, then in the
    order of ``organs`` (the run's vocabulary-ordered output organs).

    Example::

        dataset_class_channels([["liver", "kidney"], ["kidney"]], ["liver", "kidney"])
        # [(0, "liver"), (0, "kidney"), (1, "kidney")]
    """
    unknown = sorted({o for names in task_organs for o in names} - set(organs))
    if unknown:
        raise ValueError(f"task organs {unknown} are not among the output organs {list(organs)}")
    return [(ti, o) for ti, names in enumerate(task_organs) for o in organs if o in names]


def valid_channels(task: int, channels: Sequence[tuple[int, str]]) -> list[bool]:
    """Per output channel: whether a case of ``task`` has a target for it (its own dataset's channels)."""
    return [t == task for t, _ in channels]


def channel_lut(
    organ_lut: np.ndarray, task: int, channels: Sequence[tuple[int, str]], organs: Sequence[str]
) -> np.ndarray:
    """A dataset's label lookup table re-targeted to ``dataset_class`` channels.

    Args:
        organ_lut: dataset label id -> ``1 + organ index`` in ``organs`` (0: background / ignored).
        task: the dataset's task index.
        channels: the layout (:func:`dataset_class_channels`).
        organs: the run's output organs.

    Returns:
        Dataset label id -> ``1 + channel index`` (0: background / ignored).
    """
    to_channel = np.zeros(len(organs) + 1, dtype=organ_lut.dtype)
    for k, (t, organ) in enumerate(channels):
        if t == task:
            to_channel[organs.index(organ) + 1] = k + 1
    mapped = to_channel[organ_lut]
    if np.any((organ_lut > 0) & (mapped == 0)):
        missing = sorted({organs[i - 1] for i in organ_lut[(organ_lut > 0) & (mapped == 0)]})
        raise ValueError(f"task {task} labels {missing}, which have no channel of that task in the layout")
    return mapped


def merge_channels(
    probs: torch.Tensor, channels: Sequence[tuple[int, str]], organs: Sequence[str], task: int | None = None
) -> torch.Tensor:
    """Per-organ probabilities ``[C, *S]`` from ``dataset_class`` channel probabilities ``[K, *S]``.

    An organ ``task`` labels takes that task's channel; any other organ (all of them when ``task``
    is None) the mean of the probabilities of the channels labelling it (see the module docstring).

    Raises:
        ValueError: ``probs`` does not have one channel per layout entry, or an organ has no channel.
    """
    if probs.shape[0] != len(channels):
        raise ValueError(f"probs has {probs.shape[0]} channels, the layout {len(channels)}")
    out = []
    for organ in organs:
        own = [k for k, (t, o) in enumerate(channels) if o == organ and t == task]
        every = [k for k, (_, o) in enumerate(channels) if o == organ]
        if not every:
            raise ValueError(f"organ {organ!r} has no channel in the layout")
        picked = own or every
        out.append(probs[picked].mean(0))
    return torch.stack(out)
