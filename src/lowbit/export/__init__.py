"""Deployment: ONNX QDQ export for ONNX Runtime, OpenVINO and TensorRT (see docs/export.md).

onnx loads only when `export_onnx` runs, so `import lowbit` stays light.
"""

from lowbit.export.onnx import export_onnx, reduce_range_config

__all__ = ["export_onnx", "reduce_range_config"]
