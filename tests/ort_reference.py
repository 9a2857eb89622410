"""Reference quantization by ONNX Runtime: QuantizeLinear -> DequantizeLinear on given parameters.

Shared by the tests that check lowbit's arithmetic bit for bit against ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

ONNX_DTYPES = {
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int16": TensorProto.INT16,
    "uint16": TensorProto.UINT16,
    "int4": TensorProto.INT4,
    "uint4": TensorProto.UINT4,
}
_WIDENED = {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}


def _as_numpy(t: object) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor
        t = t.detach().cpu().numpy()  # type: ignore[attr-defined]
    return np.asarray(t)


def ort_quant_dequant(
    x: object,
    scale: object,
    zero_point: object,
    *,
    dtype: str = "int8",
    axis: int | None = None,
    block_size: int | None = None,
    opset: int = 21,
) -> tuple[np.ndarray, np.ndarray]:
    """Run QuantizeLinear then DequantizeLinear in ONNX Runtime.

    x: float32 data; scale: float32 (0-d for per-tensor, 1-d for per-axis, x's shape with `axis`
    reduced to the block count for blocked); zero_point: integers of the same shape as scale.
    Returns (q, y): the integer codes (int4/uint4 come back unpacked, one code per element) and
    the dequantized float32.
    """
    x = _as_numpy(x).astype(np.float32)
    scale = _as_numpy(scale).astype(np.float32)
    zp = _as_numpy(zero_point).astype(np.int64)
    elem = ONNX_DTYPES[dtype]
    attrs: dict[str, int] = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size is not None:
        attrs["block_size"] = block_size
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, scale.shape, scale.flatten().tolist()),
        helper.make_tensor("zp", elem, zp.shape, zp.flatten().tolist()),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q_raw"], **attrs),
        helper.make_node("DequantizeLinear", ["q_raw", "scale", "zp"], ["y"], **attrs),
    ]
    # onnxruntime cannot hand 4-bit tensors to numpy: widen them to 8 bits for the output.
    out_elem = _WIDENED.get(elem, elem)
    nodes.append(
        helper.make_node("Cast", ["q_raw"], ["q"], to=out_elem)
        if out_elem != elem
        else helper.make_node("Identity", ["q_raw"], ["q"])
    )
    graph = helper.make_graph(
        nodes,
        "qdq_reference",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [
            helper.make_tensor_value_info("q", out_elem, x.shape),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    # No graph rewrites: the reference must be the two kernels themselves, not a fused Q/DQ pair.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    q, y = session.run(["q", "y"], {"x": x})
    return np.asarray(q), np.asarray(y)
