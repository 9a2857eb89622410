"""Measuring what quantization cost: size, accuracy, per-layer error."""

from lowbit.evaluate.size import model_bytes

__all__ = ["model_bytes"]
