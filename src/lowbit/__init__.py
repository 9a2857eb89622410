"""lowbit: quantize PyTorch models and see what it cost.

Importing lowbit stays light: onnx, onnxruntime and plotting libraries load only where used.
"""

from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec

__version__ = "0.1.0"

__all__ = ["PerChannel", "PerGroup", "PerTensor", "QuantSpec", "__version__"]
