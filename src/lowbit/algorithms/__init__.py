"""PTQ algorithms beyond rounding to nearest, each a function over a model and data."""

from lowbit.algorithms.adaround import adaround
from lowbit.algorithms.awq import awq
from lowbit.algorithms.bias_correction import bias_correction
from lowbit.algorithms.brecq import block_reconstruction
from lowbit.algorithms.cle import equalize
from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.smoothquant import smoothquant

__all__ = [
    "adaround",
    "awq",
    "bias_correction",
    "block_reconstruction",
    "equalize",
    "gptq",
    "smoothquant",
]
