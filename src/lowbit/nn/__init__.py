"""Modules: the tensor quantizer, simulated quantized layers, converted integer layers."""

from lowbit.nn.int_modules import (
    IntConv,
    IntEmbedding,
    IntFallback,
    IntLinear,
    IntModule,
    PerTokenQuantizer,
)
from lowbit.nn.modules import QUANTIZABLE, QuantModule
from lowbit.nn.quantizer import TensorQuantizer

__all__ = [
    "QUANTIZABLE",
    "IntConv",
    "IntEmbedding",
    "IntFallback",
    "IntLinear",
    "IntModule",
    "PerTokenQuantizer",
    "QuantModule",
    "TensorQuantizer",
]
