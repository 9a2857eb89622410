"""lowbit: quantize PyTorch models and see what it cost.

Importing lowbit stays light: onnx, onnxruntime and plotting libraries load only where used.
"""

from lowbit import presets
from lowbit.api import QuantSummary, calibrate, prepare_qat, quantize
from lowbit.config import LayerQuant, QuantConfig
from lowbit.evaluate import analyze
from lowbit.convert import convert, quantize_dynamic, quantize_weights
from lowbit.io import load, save
from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec

__version__ = "0.1.0"

__all__ = [
    "LayerQuant",
    "QuantConfig",
    "QuantSummary",
    "analyze",
    "calibrate",
    "prepare_qat",
    "presets",
    "quantize",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QuantSpec",
    "__version__",
    "convert",
    "load",
    "quantize_dynamic",
    "quantize_weights",
    "save",
]
