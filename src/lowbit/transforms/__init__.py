"""Model rewrites applied before quantization (layer 4): BN folding, fusion, module swaps."""

from lowbit.transforms.fold_bn import PRODUCER_TYPES, flatten_outputs, fold_batchnorm, fold_bn_into

__all__ = ["PRODUCER_TYPES", "flatten_outputs", "fold_batchnorm", "fold_bn_into"]
