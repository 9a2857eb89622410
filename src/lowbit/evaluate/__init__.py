"""Measuring what quantization cost: size, accuracy, per-layer error."""

from lowbit.evaluate.size import model_bytes
from lowbit.evaluate.sqnr import LayerError, analyze, output_sqnr

__all__ = ["LayerError", "analyze", "model_bytes", "output_sqnr"]
