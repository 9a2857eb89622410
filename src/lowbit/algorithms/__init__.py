"""PTQ algorithms beyond rounding to nearest, each a function over a model and data."""

from lowbit.algorithms.awq import awq
from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.smoothquant import smoothquant

__all__ = ["awq", "gptq", "smoothquant"]
