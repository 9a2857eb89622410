"""Modules: the tensor quantizer, simulated quantized layers, converted integer layers."""

from lowbit.nn.int_base import IntFallback, IntModule
from lowbit.nn.int_conv import IntConv
from lowbit.nn.int_embedding import IntEmbedding
from lowbit.nn.int_linear import IntLinear
from lowbit.nn.modules import QUANTIZABLE, QuantModule
from lowbit.nn.per_token import PerTokenQuantizer
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
