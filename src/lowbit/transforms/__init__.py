"""Model rewrites applied before quantization (layer 4): BN folding, fusion, module swaps, and
the tracer of one forward pass they read."""

from lowbit.transforms.fold_bn import PRODUCER_TYPES, flatten_outputs, fold_batchnorm, fold_bn_into
from lowbit.transforms.trace import Call, Trace, Value, trace

__all__ = [
    "PRODUCER_TYPES",
    "Call",
    "Trace",
    "Value",
    "flatten_outputs",
    "fold_batchnorm",
    "fold_bn_into",
    "trace",
]
