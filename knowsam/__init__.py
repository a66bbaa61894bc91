"""knowsam-bench: a benchmark harness for KnowSAM and semi-supervised medical image segmentation."""

__version__ = "0.1.0"
