"""ONNX Runtime: a quantized Gemm with a float output (the classifier, whose logits stay float)
becomes an integer matrix product.

ONNX Runtime fuses `DQ(x) , DQ(W) -> Gemm` into an integer kernel only when a QuantizeLinear
follows; without one it dequantizes the whole weight at every run and multiplies in float
(EfficientNet-Lite0's 1280 x 1000 classifier: about 20 ms of a batch of 32 on two cores). The
standard ONNX form `MatMulInteger -> Cast -> Mul(scale_x * scale_w) -> Add(bias)` multiplies the
same uint8 activation codes by the same int8 weight codes, sums exactly in int32 and scales the
sum once: the values of `DQ -> Gemm` to float rounding, about 1 ms there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.export._graph import consumers


def integer_gemms(graph: Any) -> int:
    """Rewrite every eligible float-output Gemm as an integer product; returns how many.

    Eligible: A is a per-tensor uint8 DequantizeLinear (of a QuantizeLinear's codes), B a
    DequantizeLinear of int8 weight codes (an initializer) per output channel or per tensor,
    alpha = beta = 1, A not transposed, and no QuantizeLinear reads the output (ONNX Runtime
    fuses that case itself)."""
    producers = {o: n for n in graph.node for o in n.output}
    readers = consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    replaced: dict[int, list[Any]] = {}
    for gemm in graph.node:
        parts = _eligible(gemm, producers, readers, inits)
        if parts is not None:
            replaced[id(gemm)] = _integer_product(graph, gemm, *parts, inits)
    if replaced:
        kept: list[Any] = []
        for node in graph.node:
            kept.extend(replaced.get(id(node), [node]))
        del graph.node[:]
        graph.node.extend(kept)
        _drop_unread_dequantize(graph)
    return len(replaced)


def _integer_product(
    graph: Any, gemm: Any, dq_a: Any, dq_b: Any, inits: dict[str, Any]
) -> list[Any]:
    """MatMulInteger -> Cast -> Mul -> (Add) nodes computing `gemm`; their new initializers (the
    weight codes as [K, N], the product of the scales) are added to `graph`."""
    from onnx import TensorProto, helper, numpy_helper

    name = gemm.name or gemm.output[0]
    codes = numpy_helper.to_array(inits[dq_b.input[0]])
    if _attribute(gemm, "transB", 0):
        codes = np.ascontiguousarray(codes.T)
    scale = numpy_helper.to_array(inits[dq_a.input[1]]).astype(np.float32) * numpy_helper.to_array(
        inits[dq_b.input[1]]
    ).astype(np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(codes, f"{name}/weight_codes_kn"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}/product_scale"),
        ]
    )
    out = gemm.output[0]
    steps = [f"{name}/int32", f"{name}/float", out if len(gemm.input) < 3 else f"{name}/scaled"]
    nodes = [
        helper.make_node(
            "MatMulInteger",
            [dq_a.input[0], f"{name}/weight_codes_kn", dq_a.input[2], dq_b.input[2]],
            [steps[0]],
            name=f"{name}/MatMulInteger",
        ),
        helper.make_node("Cast", [steps[0]], [steps[1]], name=f"{name}/Cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [steps[1], f"{name}/product_scale"], [steps[2]], f"{name}/Mul"),
    ]
    if len(gemm.input) > 2:
        nodes.append(helper.make_node("Add", [steps[2], gemm.input[2]], [out], name=f"{name}/Add"))
    return nodes


def _eligible(
    gemm: Any, producers: dict[str, Any], readers: dict[str, list[Any]], inits: dict[str, Any]
) -> tuple[Any, Any] | None:
    from onnx import TensorProto

    if gemm.op_type != "Gemm" or _attribute(gemm, "transA", 0) != 0:
        return None
    if _attribute(gemm, "alpha", 1.0) != 1.0 or _attribute(gemm, "beta", 1.0) != 1.0:
        return None
    if any(r.op_type == "QuantizeLinear" for r in readers.get(gemm.output[0], [])):
        return None
    dq_a, dq_b = producers.get(gemm.input[0]), producers.get(gemm.input[1])
    if dq_a is None or dq_b is None or dq_a.op_type != "DequantizeLinear" or len(dq_a.input) < 3:
        return None
    zero_a, scale_a = inits.get(dq_a.input[2]), inits.get(dq_a.input[1])
    if zero_a is None or scale_a is None:  # (the codes may come from a Q or a Clip of codes)
        return None
    if zero_a.data_type != TensorProto.UINT8 or _size(scale_a) != 1:
        return None
    if dq_b.op_type != "DequantizeLinear" or len(dq_b.input) < 3:
        return None
    codes, zero_b = inits.get(dq_b.input[0]), inits.get(dq_b.input[2])
    if codes is None or zero_b is None or codes.data_type != TensorProto.INT8:
        return None
    n_axis = 0 if _attribute(gemm, "transB", 0) else 1  # B's output-channel axis
    per_tensor = _size(zero_b) == 1
    if not per_tensor and _attribute(dq_b, "axis", 1) != n_axis:
        return None
    return dq_a, dq_b


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _size(tensor: Any) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def _drop_unread_dequantize(graph: Any) -> None:
    """Remove the weight DequantizeLinear nodes nothing reads any more."""
    readers = consumers(graph)
    outputs = {o.name for o in graph.output}
    kept = [
        n
        for n in graph.node
        if n.op_type != "DequantizeLinear" or n.output[0] in readers or n.output[0] in outputs
    ]
    del graph.node[:]
    graph.node.extend(kept)
