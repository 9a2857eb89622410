"""`export_openvino`: a lowbit-quantized model to OpenVINO IR (`.xml` + `.bin`).

The IR is OpenVINO's own reading of lowbit's QDQ export for target="openvino" (int8 activations
with zero point 0, which its CPU plugin runs faster than the uint8 form ONNX Runtime wants):
`openvino.convert_model` turns each QuantizeLinear -> DequantizeLinear pair into a FakeQuantize
and each integer weight -> DequantizeLinear into int8 constants, as for any QDQ model, so the IR
holds exactly the numbers of the ONNX file. The placement of the quantizers is the same as for
ONNX Runtime (inputs of layers, outputs that reach Adds and pools, residual Adds): OpenVINO's
low-precision transformations run those layers and Adds in int8 (benchmarks/openvino.py), so no
separate preset is needed. Nothing is compressed to fp16: the float parts stay as the
simulation computes them.

openvino is imported only when `export_openvino` runs (`pip install openvino`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lowbit._atomic import write_atomic
from lowbit.distributed import on_rank_zero
from lowbit.export._trace import DynamicAxes
from lowbit.export.onnx import export_onnx


def export_openvino(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    dynamic_axes: DynamicAxes | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    every_rank: bool = False,
) -> Path:
    """Export a model from `lowbit.quantize` to OpenVINO IR: `path` (.xml) and the .bin beside it.

    example_inputs, opset, dynamic_axes, input_names, output_names: as for `export_onnx` (the IR
    keeps the dynamic dimensions; `openvino.Core().read_model(path)` then `reshape` fixes them).
    The IR matches the ONNX export for target="openvino": weights bit for bit, activations to
    within float rounding. Both files are written atomically (the .bin first); under
    torch.distributed rank 0 alone writes, unless `every_rank=True`.

    Raises ValueError for a path that does not end in .xml, ImportError without openvino, and
    whatever `export_onnx` raises for a model ONNX cannot express.
    """
    out = Path(path)
    if out.suffix != ".xml":
        raise ValueError(f"an OpenVINO IR path ends in .xml (the .bin goes beside it): {path!r}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no such folder: {out.parent}")
    try:
        import openvino as ov
    except ImportError as error:
        raise ImportError(
            f"export_openvino needs openvino (pip install openvino); {error}"
        ) from None

    def write() -> Path:
        with tempfile.TemporaryDirectory(prefix="lowbit-openvino-") as tmp:
            onnx_path = export_onnx(
                model,
                example_inputs,
                Path(tmp) / "model.onnx",
                opset=opset,
                dynamic_axes=dynamic_axes,
                input_names=input_names,
                output_names=output_names,
                target="openvino",
                every_rank=True,
            )
            xml = Path(tmp) / "model.xml"
            ov.save_model(ov.convert_model(onnx_path), xml, compress_to_fp16=False)
            write_atomic(out.with_suffix(".bin"), xml.with_suffix(".bin").read_bytes())
            write_atomic(out, xml.read_bytes())
        return out

    on_rank_zero(write, every_rank=every_rank)
    return out
