"""mosmos: report-supervised vision-language pretraining and multi-organ segmentation.

The shared library under both stages: organ vocabulary, config loading, NIfTI I/O,
synthetic data, the Accelerate training engine, the stage 1 -> stage 2 encoder export and the
``mosmos`` command line.

Example::

    enc = mosmos.load_encoder("runs/pretrain")  # encoder, tag head and preprocessing of a stage 1 run
    features = enc.encoder(image)["features"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mosmos.export import load_encoder

__version__ = "0.2.0"
__all__ = ["__version__", "load_encoder"]


def __getattr__(name: str) -> Any:
    # resolved on first use (PEP 562): `import mosmos` must not import torch
    if name == "load_encoder":
        from mosmos.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'mosmos' has no attribute {name!r}")
