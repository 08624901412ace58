"""mosmos: report-supervised vision-language pretraining and multi-organ segmentation.

The shared library under both stages: organ vocabulary, config loading, NIfTI I/O,
synthetic data, the Accelerate training engine and the ``mosmos`` command line.
"""

__version__ = "0.1.0"
