"""mosmos: report-supervised vision-language pretraining and multi-organ segmentation.

The shared library under both stages: organ vocabulary, config loading, NIfTI I/O,
synthetic data, the Accelerate training engine, the stage 1 -> stage 2 encoder export and the
``mosmos`` command line.

Example::

    model = mosmos.from_pretrained("exports/stage1")  # `mosmos export RUN --output exports/stage1`
    image, mask = model.load_image("ct.nii.gz")
    similarity = model.encode_image(image, mask) @ model.encode_text(["No focal liver lesion."]).T
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mosmos.api import from_pretrained
    from mosmos.export import load_encoder

__version__ = "0.2.0"
__all__ = ["__version__", "from_pretrained", "load_encoder"]


def __getattr__(name: str) -> Any:
    # resolved on first use (PEP 562): `import mosmos` must not import torch
    if name == "load_encoder":
        from mosmos.export import load_encoder

        return load_encoder
    if name == "from_pretrained":
        # by name: the package's own facade may offer the top layer's API, while the core modules
        # that import `mosmos` (for __version__) must not depend on it through this file
        import importlib

        return importlib.import_module("mosmos.api").from_pretrained
    raise AttributeError(f"module 'mosmos' has no attribute {name!r}")
