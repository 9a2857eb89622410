"""Reference quantization by ONNX Runtime: QuantizeLinear -> DequantizeLinear on given parameters,
and the check that an exported model's activation codes are the simulation's.

Shared by the tests that check lowbit's arithmetic bit for bit against ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from lowbit.nn.modules import quant_modules
from lowbit.nn.op_points import op_points
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.numerics import quantize

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


# How far from a rounding boundary ORT's plain Q/DQ graph and the simulation may put the same
# activation, in quantization steps: the same float32 sums in another order (and BatchNorm folded
# into the weight) differ by a few ulps of the sum; with values of at most 2^8 steps (8-bit codes)
# and at most 2^9 terms, n * 2^-24 of it is 2^8 * 2^9 * 2^-24 = 2^-7 step.
BOUNDARY_TOLERANCE_STEPS = 2.0**-7
_ACTIVATION_SCALES = (".input_scale", ".output_scale")


def activation_code_flips(
    path: object,
    qmodel: torch.nn.Module,
    x: torch.Tensor,
    tolerance: float = BOUNDARY_TOLERANCE_STEPS,
) -> np.ndarray:
    """Per sample of `x`, whether ORT's plain Q/DQ graph (no rewrites) gave one of its activations
    another code than the simulation `qmodel`; checks that each such code is a rounding boundary.

    Up to and including the first layer whose codes differ for a sample, every code ORT computes
    is the simulation's, or one step away where the simulation's value lies within `tolerance`
    steps of the boundary between the two: float rounding, not an export error. What follows in
    that sample (more codes moved, a few logit steps) is its consequence.
    """
    model = onnx.load(str(path))
    zero_points = {t.name: t for t in model.graph.initializer}
    sites = [  # (ORT's codes, their zero point, "layer.role") for each activation quantizer
        (n.input[0], zero_points[n.input[2]], n.input[1].removesuffix("_scale"))
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[1].endswith(_ACTIVATION_SCALES)
    ]
    if not sites:
        return np.zeros(len(x), dtype=bool)
    for codes, zero_point, _ in sites:
        model.graph.output.append(helper.make_tensor_value_info(codes, zero_point.data_type, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    theirs = session.run([codes for codes, _, _ in sites], {"input": x.numpy()})
    quantizers = activation_quantizers(qmodel)
    simulated = _quantizer_inputs(qmodel, x, {name: quantizers[name] for _, _, name in sites})
    flipped = np.zeros(len(x), dtype=bool)
    for (_, zero_point, name), ort_codes in zip(sites, theirs, strict=True):
        quantizer = quantizers[name]
        zp = quantizer.zero_point
        value = simulated[name] / quantizer.scale  # in steps from the zero point
        ours = quantize(simulated[name], quantizer.scale, zp, quantizer.spec).long() - zp
        # codes relative to their zero point: an int8 export may be uint8 with zero point 128
        ort_relative = ort_codes.astype(np.int64) - numpy_helper.to_array(zero_point).astype(int)
        step = torch.from_numpy(ort_relative).reshape(ours.shape) - ours
        boundary = torch.minimum(ours, ours + step) + 0.5
        explained = (step == 0) | ((step.abs() == 1) & ((value - boundary).abs() <= tolerance))
        assert explained[torch.from_numpy(~flipped)].all(), name
        flipped |= (step != 0).any(1).numpy()
    return flipped


def activation_quantizers(qmodel: torch.nn.Module) -> dict[str, TensorQuantizer]:
    """The input and output quantizers by export site name: "layer.input", "layer.output" and
    "<calling module>.add_0.output" for functional-op points."""
    found = {
        f"{layer}.{role}": q
        for layer, m in quant_modules(qmodel).items()
        for role, q in m.quantizers().items()
        if role != "weight"
    }
    for points in op_points(qmodel).values():
        found.update({f"{points.point(k)}.output": q for k, q in points.quantizers().items()})
    return found


def _quantizer_inputs(
    qmodel: torch.nn.Module, x: torch.Tensor, quantizers: dict[str, TensorQuantizer]
) -> dict[str, torch.Tensor]:
    """What each of `quantizers` (by name) receives when `qmodel` runs `x`, one row a sample."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        seen[name] = value.detach().flatten(1)

    hooks = [
        q.register_forward_pre_hook(lambda _, a, n=name: keep(n, a[0]))
        for name, q in quantizers.items()
    ]
    try:
        with torch.no_grad():
            qmodel(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen
