"""Deployment: ONNX QDQ export for ONNX Runtime, OpenVINO and TensorRT, and OpenVINO IR (see
docs/export.md).

onnx and openvino load only when an export runs, so `import lowbit` stays light.
"""

from lowbit.export.onnx import export_onnx, reduce_range_config
from lowbit.export.openvino import export_openvino

__all__ = ["export_onnx", "export_openvino", "reduce_range_config"]
