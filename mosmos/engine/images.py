"""Pictures a run draws (stage 1's attention montages, stage 2's validation overlays) as TensorBoard
images beside its scalars, when the run logs to TensorBoard (``train.log_with: tensorboard``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from accelerate import Accelerator


def log_images(accelerator: Accelerator, images: dict[str, np.ndarray | str | Path], step: int) -> bool:
    """Add each ``{tag: picture}`` to the run's TensorBoard log at ``step``; False when the run has no
    TensorBoard tracker (or this is not the main process), and nothing is written.

    A picture is an ``[H, W, 3]`` (or RGBA) array in [0, 1] or a PNG file. This works during
    training and after ``end_training`` (the tracker's writer opens a new event file in the same
    folder, which TensorBoard reads as the same run).
    """
    if not images or not accelerator.is_main_process:
        return False
    try:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
    except ValueError:  # the run logs to another tracker
        return False
    if not hasattr(writer, "add_image"):  # no tracker at all (train.log_with: none)
        return False
    from matplotlib.image import imread

    for tag, picture in images.items():
        array = imread(picture) if isinstance(picture, (str, Path)) else np.asarray(picture)
        writer.add_image(tag, array[..., :3], step, dataformats="HWC")
    writer.flush()
    return True
