"""Reading and writing models: lowbit's own files, and ONNX files imported as PyTorch modules."""

from lowbit.io.lowbit_format import load, read_extra, read_header, save

__all__ = ["load", "read_extra", "read_header", "save"]
