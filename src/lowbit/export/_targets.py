"""The runtime an export is for: the same numbers, written in the form that runtime runs fast.

- ONNX Runtime's x86 integer kernels (QLinearConv, QLinearMatMul) multiply uint8 activations by
  int8 weights; with int8 activations they take a slow path. A signed 8-bit activation with zero
  point z is written as uint8 with zero point z + 128: codes move by 128 and saturate at the same
  ends, so every dequantized value is the same. OpenVINO runs int8 with zero point 0 about 10%
  faster than that uint8 form (EfficientNet-Lite0, benchmarks/onnx_runtime.py): it keeps int8.
- ONNX Runtime fuses `DQ -> Conv -> Q` into QLinearConv only when nothing sits between the Conv
  and its Q. A Relu / Clip there (ReLU6 before a symmetric quantizer) is moved after the Q as a
  Clip of the integer codes: Q is monotone, so Q(clip(x, lo, hi)) = clamp(Q(x), Q(lo), Q(hi)).
- ONNX Runtime fuses a Gemm whose inputs are dequantized into its integer QGemm, with a float
  output where no Q follows (a classifier's logits), only when every input is dequantized: a
  float bias (lowbit keeps biases float) leaves the weight dequantized at every run and the
  product in float. Such a Gemm's bias moves into an Add after it: the same sum, in float.
- TensorRT accepts only int8 Q/DQ with zero point 0: the file stays as traced, as for OpenVINO,
  and an affine (uint8) activation is a ValueError rather than a file TensorRT refuses.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from lowbit.exceptions import LowbitWarning
from lowbit.export._graph import Constants, consumers

TARGETS = ("onnxruntime", "openvino", "tensorrt")
DEFAULT_TARGET = "onnxruntime"
_CLIPS = ("Relu", "Clip")
_SAFE_FROM_HALF = 1e-3  # a bound this close to a rounding tie keeps its float Clip


def check_target(target: object) -> str:
    """`target` if it names a supported runtime, else a ValueError listing them."""
    if not isinstance(target, str) or target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(map(repr, TARGETS))}, got {target!r}")
    return target


def retarget(graph: Any, target: str) -> None:
    """Rewrite a QDQ graph (Q/DQ already in place) into `target`'s fast form, values unchanged."""
    if target == "onnxruntime":
        activations_as_uint8(graph)
        clip_codes_after_quantize(graph)
        bias_after_float_gemm(graph)
        _warn_float_convs(graph)
    elif target == "tensorrt":
        check_int8_zero_point(graph)


def float_convs(graph: Any) -> list[str]:
    """Quantized convolutions (a DequantizeLinear on their input) whose output meets no single
    QuantizeLinear, through a Relu / Clip at most, and is no model output: ONNX Runtime runs
    them in float."""
    producers = {o: n for n in graph.node for o in n.output}
    readers = consumers(graph)
    outputs = {o.name for o in graph.output}  # model outputs stay float by design
    found = []
    for conv in graph.node:
        source = producers.get(conv.input[0])
        if conv.op_type != "Conv" or source is None or source.op_type != "DequantizeLinear":
            continue
        end, users = conv.output[0], readers.get(conv.output[0], [])
        while len(users) == 1 and users[0].op_type in _CLIPS:
            end, users = users[0].output[0], readers.get(users[0].output[0], [])
        if end not in outputs and [u.op_type for u in users] != ["QuantizeLinear"]:
            weight = producers.get(conv.input[1])
            codes = weight.input[0] if weight is not None else conv.input[1]
            found.append(codes.removesuffix(".weight_quantized"))
    return found


def _warn_float_convs(graph: Any) -> None:
    names = float_convs(graph)
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        warnings.warn(
            f"ONNX Runtime will run {len(names)} quantized convolution(s) in float ({shown}): "
            "their outputs reach an Add, a pool or several layers unquantized; quantize with "
            "fusable_outputs=True (the int8 presets' default) to run them as QLinearConv",
            LowbitWarning,
            stacklevel=5,
        )


def check_int8_zero_point(graph: Any) -> None:
    """TensorRT reads only int8 QuantizeLinear with zero point 0: a ValueError naming the first
    quantizer that is not (uint8 / affine activations have no exact int8 zero-point-0 form)."""
    inits = Constants(graph)
    for q in graph.node:
        zero_point = inits.get(q.input[2]) if len(q.input) > 2 else None
        if q.op_type != "QuantizeLinear" or (
            zero_point is not None and zero_point.dtype == np.int8 and not zero_point.any()
        ):
            continue
        where = q.name.removesuffix("/QuantizeLinear")
        kind = "uint8" if zero_point is None else zero_point.dtype
        value = 0 if zero_point is None else zero_point.tolist()
        raise ValueError(
            f"target='tensorrt' needs symmetric int8 activations (zero point 0), but {where} "
            f"is quantized as {kind} with zero point {value}: "
            "quantize with presets.int8() for TensorRT, or export with "
            "target='onnxruntime' / 'openvino'"
        )


def activations_as_uint8(graph: Any) -> int:
    """int8 QuantizeLinear -> DequantizeLinear pairs become uint8, zero point + 128.

    Only activations are touched: weights have no QuantizeLinear, so their int8 zero points (the
    u8 x s8 kernels want int8 weights) stay. Returns how many zero points moved.
    """
    from onnx import TensorProto, numpy_helper

    names = {n.input[2] for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    moved = 0
    for i, tensor in enumerate(graph.initializer):
        if tensor.name in names and tensor.data_type == TensorProto.INT8:
            shifted = numpy_helper.to_array(tensor).astype(np.int16) + 128
            graph.initializer[i].CopyFrom(
                numpy_helper.from_array(shifted.astype(np.uint8), tensor.name)
            )
            moved += 1
    return moved


def bias_after_float_gemm(graph: Any) -> int:
    """`DQ, DQ, bias -> Gemm` with a float output becomes `Gemm(DQ, DQ) -> Add(bias)`.

    Only a Gemm with both operands dequantized, a bias that is not, beta 1 and an output no
    QuantizeLinear reads (ORT fuses that case with its float bias as it is). Returns how many.
    """
    from onnx import helper

    producers = {o: n for n in graph.node for o in n.output}
    users = consumers(graph)
    moved = 0
    nodes: list[Any] = []
    for node in graph.node:
        nodes.append(node)
        if not _dequantized_float_gemm(node, producers, users):
            continue
        bias, product = node.input[2], f"{node.output[0]}_without_bias"
        del node.input[2]
        output, node.output[0] = node.output[0], product
        nodes.append(helper.make_node("Add", [product, bias], [output], name=f"{node.name}/bias"))
        moved += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return moved


def _dequantized_float_gemm(
    node: Any, producers: dict[str, Any], users: dict[str, list[Any]]
) -> bool:
    if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
        return False
    kinds = [getattr(producers.get(name), "op_type", None) for name in node.input]
    beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
    quantized = any(u.op_type == "QuantizeLinear" for u in users.get(node.output[0], []))
    dequantized = kinds[0] == kinds[1] == "DequantizeLinear"
    return dequantized and kinds[2] != "DequantizeLinear" and beta == 1.0 and not quantized


def clip_codes_after_quantize(graph: Any) -> int:
    """`Relu / Clip -> QuantizeLinear` becomes `QuantizeLinear -> Clip` of the codes.

    Exact (see the module docstring), and the Conv before it then meets its Q directly, as
    QLinearConv needs. A clip that removes no code is dropped; one whose bound lies within float
    rounding of a rounding tie, or a per-axis Q, is left as it is. Returns how many were moved.
    """
    from onnx import helper

    inits = Constants(graph)
    users = consumers(graph)
    outputs = {o.name for o in graph.output}
    moved: dict[str, tuple[Any, list[str]]] = {}  # Q name -> (clip node, its new inputs)
    for clip in graph.node:
        readers = users.get(clip.output[0], [])
        if clip.op_type not in _CLIPS or len(readers) != 1 or clip.output[0] in outputs:
            continue
        q = readers[0]
        if q.op_type != "QuantizeLinear" or len(q.input) < 3:
            continue
        bounds = _code_bounds(clip, q, inits)
        if bounds is not None:
            moved[q.name] = (clip, _bound_inputs(graph, q, bounds, inits))
    dropped = {id(clip) for clip, _ in moved.values()}
    nodes: list[Any] = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        nodes.append(node)
        if node.name not in moved:
            continue
        clip, bound_inputs = moved[node.name]
        node.input[0] = clip.input[0]
        if bound_inputs:
            codes = f"{node.output[0]}_unclipped"
            clipped = node.output[0]
            node.output[0] = codes
            nodes.append(
                helper.make_node(
                    "Clip", [codes, *bound_inputs], [clipped], name=f"{clip.name}/codes"
                )
            )
    del graph.node[:]
    graph.node.extend(nodes)
    return len(moved)


def _code_bounds(clip: Any, q: Any, inits: Constants) -> tuple[int | None, int | None] | None:
    """The clip's bounds as codes of `q` (None where it removes no code), or None if not exact."""
    scale, zero_point = inits.get(q.input[1]), inits.get(q.input[2])
    if scale is None or zero_point is None or scale.size != 1:
        return None
    lo_hi = _float_bounds(clip, inits)
    if lo_hi is None:
        return None
    info = np.iinfo(zero_point.dtype)
    codes: list[int | None] = []
    for bound, limit in zip(lo_hi, (info.min, info.max), strict=True):
        if bound is None:
            codes.append(None)
            continue
        steps = np.float32(bound) / np.float32(scale.item())
        if abs(abs(steps - np.floor(steps)) - 0.5) < _SAFE_FROM_HALF:
            return None
        code = int(np.clip(np.rint(steps) + int(zero_point.item()), info.min, info.max))
        codes.append(None if code == limit else code)
    return codes[0], codes[1]


def _float_bounds(clip: Any, inits: Constants) -> tuple[float | None, float | None] | None:
    """(min, max) of a Relu / Clip with constant bounds (None for an absent one)."""
    if clip.op_type == "Relu":
        return 0.0, None
    if any(a.name in ("min", "max") for a in clip.attribute):  # opset < 11 form: not traced
        return None
    bounds: list[float | None] = []
    for i in (1, 2):
        name = clip.input[i] if len(clip.input) > i else ""
        if name and name not in inits:
            return None
        bounds.append(float(inits[name]) if name else None)
    return bounds[0], bounds[1]


def _bound_inputs(
    graph: Any, q: Any, bounds: tuple[int | None, int | None], inits: Constants
) -> list[str]:
    """Initializers holding the code bounds, in the zero point's type; [] when none clips."""
    from onnx import numpy_helper

    if bounds == (None, None):
        return []
    zero_point = inits[q.input[2]]
    names = []
    for which, code in zip(("min", "max"), bounds, strict=True):
        if code is None:
            names.append("")
            continue
        name = f"{q.name}/clip_{which}"
        graph.initializer.append(numpy_helper.from_array(np.array(code, zero_point.dtype), name))
        names.append(name)
    while names and not names[-1]:
        names.pop()
    return names
