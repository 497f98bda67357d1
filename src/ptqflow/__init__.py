"""ptqflow: post-training quantization of vision models (BRECQ, QDrop, MRECG), cached through DVC."""

__version__ = "0.1.0"
