"""lowbit: quantize PyTorch models and see what it cost.

Importing lowbit stays light: onnx, onnxruntime and plotting libraries load only where used.
"""

from lowbit import presets
from lowbit.config import LayerQuant, QuantConfig
from lowbit.distributed import DistributedError
from lowbit.evaluate import analyze
from lowbit.evaluate.diagnosis import diagnose
from lowbit.evaluate.mixed_precision import auto_quantize
from lowbit.exceptions import LowbitWarning, OpPointMismatch
from lowbit.export import export_onnx, export_openvino
from lowbit.io import load, save
from lowbit.pretrained import load_pretrained, quantize_pretrained
from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec
from lowbit.workflows.conversion import convert, quantize_dynamic, quantize_weights
from lowbit.workflows.quantization import QuantSummary, calibrate, prepare_qat, quantize
from lowbit.workflows.reconstruction import brecq
from lowbit.workflows.sharded import sync_ranges

__version__ = "0.1.0"

__all__ = [
    "DistributedError",
    "LayerQuant",
    "LowbitWarning",
    "OpPointMismatch",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QuantConfig",
    "QuantSpec",
    "QuantSummary",
    "__version__",
    "analyze",
    "auto_quantize",
    "brecq",
    "calibrate",
    "convert",
    "diagnose",
    "export_onnx",
    "export_openvino",
    "load",
    "load_pretrained",
    "prepare_qat",
    "presets",
    "quantize",
    "quantize_dynamic",
    "quantize_pretrained",
    "quantize_weights",
    "save",
    "sync_ranges",
]
