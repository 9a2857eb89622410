"""ONNX graph rewrites after tracing: lowbit markers become QuantizeLinear / DequantizeLinear.

The traced graph holds one `lowbit::Quant` node per quantized tensor (see `onnx.py`). Here each
becomes either an integer initializer -> DequantizeLinear (weights) or QuantizeLinear ->
DequantizeLinear (activations), constant shape arithmetic is folded, zero Pads are folded into the
Conv that consumes them so the Q/DQ pairs sit directly before it (the placement TensorRT's explicit
quantization and ONNX Runtime's QDQ fusions look for), and unused initializers go.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from lowbit.export._sites import INT4, INT8, INT16, UINT4, UINT8, UINT16, Site

MARKER_DOMAIN = "lowbit"
MARKER_OP = "Quant"
# Ops whose all-constant instances are evaluated once at export (shape arithmetic from tracing).
_FOLDABLE = {
    "Constant",
    "ConstantOfShape",
    "Concat",
    "Reshape",
    "Slice",
    "Transpose",
    "Cast",
    "Squeeze",
    "Unsqueeze",
    "Gather",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Range",
    "Expand",
    "Shape",
}
_FOLD_MAX_ELEMENTS = 1 << 16


def _onnx_elem(name: str) -> int:
    from onnx import TensorProto

    return {
        INT4: TensorProto.INT4,
        UINT4: TensorProto.UINT4,
        INT8: TensorProto.INT8,
        UINT8: TensorProto.UINT8,
        INT16: TensorProto.INT16,
        UINT16: TensorProto.UINT16,
    }[name]


def _tensor(name: str, values: Any, elem: str | None = None) -> Any:
    """An initializer; integer element types named by `elem` (INT4 packed by onnx.helper)."""
    from onnx import TensorProto, helper, numpy_helper

    array = np.asarray(values)
    if elem is None:
        return numpy_helper.from_array(array.astype(np.float32), name)
    if elem in (INT4, UINT4):
        flat = array.astype(np.int64).flatten().tolist()
        return helper.make_tensor(name, _onnx_elem(elem), array.shape, flat)
    dtype = {INT8: np.int8, UINT8: np.uint8, INT16: np.int16, UINT16: np.uint16}[elem]
    tensor = numpy_helper.from_array(array.astype(dtype), name)
    assert tensor.data_type in (
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.INT16,
        TensorProto.UINT16,
    )
    return tensor


class Constants(Mapping[str, np.ndarray]):
    """A graph's initializers as numpy arrays, each converted once, when first read: the float
    weights the markers replace (pruned at the end) never are."""

    def __init__(self, graph: Any) -> None:
        self._protos = {t.name: t for t in graph.initializer}
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None:
            from onnx import numpy_helper

            array = self._arrays[name] = numpy_helper.to_array(self._protos[name])
        return array

    def __contains__(self, name: object) -> bool:
        return name in self._arrays or name in self._protos

    def __iter__(self) -> Iterator[str]:
        return iter(self._protos.keys() | self._arrays.keys())

    def __len__(self) -> int:
        return len(self._protos.keys() | self._arrays.keys())

    def add(self, name: str, array: np.ndarray) -> None:
        """A value computed at export (a folded constant), read like an initializer."""
        self._arrays[name] = array


def fold_constants(graph: Any, opset: int) -> None:
    """Evaluate small all-constant subgraphs (Pad amounts, reshape targets) into initializers;
    `opset`: the one the exporter wrote them at (Slice, Pad and Reduce* change across opsets)."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    known = Constants(graph)
    kept, folded = [], {}
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if (
            node.domain in ("", "ai.onnx")
            and node.op_type in _FOLDABLE
            and all(i in known for i in inputs)
            and sum(known[i].size for i in inputs) <= _FOLD_MAX_ELEMENTS
        ):
            values = _evaluate(ReferenceEvaluator, node, {i: known[i] for i in inputs}, opset)
            if values is not None:
                for name, value in zip(node.output, values, strict=True):
                    known.add(name, value)
                    folded[name] = value
                continue
        kept.append(node)
    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(kept)
    for name, value in folded.items():
        if name in used:
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))


def _evaluate(
    evaluator: Any, node: Any, feeds: dict[str, np.ndarray], opset: int
) -> list[Any] | None:
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in feeds.items()]
    graph = helper.make_graph(
        [node],
        "fold",
        [],
        [helper.make_empty_tensor_value_info(o) for o in node.output],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        return [np.asarray(v) for v in evaluator(model).run(None, {})]
    except Exception:  # an op the reference cannot run here: leave it to the runtime
        return None


def replace_markers(graph: Any, sites: dict[str, Site]) -> None:
    """Each `lowbit::Quant` node -> integer initializer + DQ, or Q + DQ, with named parameters."""
    nodes: list[Any] = []
    have = {t.name for t in graph.initializer}

    def add(tensor: Any) -> None:
        if tensor.name not in have:
            have.add(tensor.name)
            graph.initializer.append(tensor)

    for node in graph.node:
        if node.domain != MARKER_DOMAIN:
            nodes.append(node)
            continue
        site = sites[next(a.s.decode() for a in node.attribute if a.name == "key")]
        scale, zp = f"{site.key}_scale", f"{site.key}_zero_point"
        add(_tensor(scale, site.scale.numpy()))
        add(_tensor(zp, site.zero_point.numpy(), site.elem))
        if site.is_weight:
            assert site.codes is not None
            source = f"{site.key}_quantized"
            add(_tensor(source, site.codes.to(torch.int32).numpy(), site.elem))
        else:
            source = f"{site.key}_q"
            nodes.append(_qdq_node("QuantizeLinear", site, node.input[0], source))
        nodes.append(_qdq_node("DequantizeLinear", site, source, node.output[0]))
    del graph.node[:]
    graph.node.extend(nodes)


def _qdq_node(op: str, site: Site, source: str, out: str) -> Any:
    """`op` (QuantizeLinear / DequantizeLinear) of `source` with the site's named parameters."""
    from onnx import helper

    attrs: dict[str, Any] = {}
    if site.axis is not None:
        attrs["axis"] = site.axis
    if site.block_size is not None:
        attrs["block_size"] = site.block_size
    inputs = [source, f"{site.key}_scale", f"{site.key}_zero_point"]
    return helper.make_node(op, inputs, [out], name=f"{site.key}/{op}", **attrs)


def fold_zero_pad_into_conv(graph: Any) -> int:
    """Pad(zeros) -> Conv becomes one Conv with those `pads`; returns how many were folded.

    Exact: a constant-zero Pad of the spatial dimensions is what Conv's own (possibly asymmetric)
    `pads` attribute does, and 0 is on every lowbit grid (zero points are integers), so the
    Q/DQ pair before the Pad now sits directly before the Conv: the placement TensorRT's explicit
    quantization and ONNX Runtime's QLinearConv fusion look for. Without it ONNX Runtime pads
    the dequantized float tensor and requantizes it, which costs more than the convolution.
    Subclassed convs that pad then convolve (EfficientNet's Conv2dStaticSamePadding) need it.
    """
    from onnx import helper

    inits = {t.name: t for t in graph.initializer}
    readers = consumers(graph)
    folded: set[int] = set()
    for pad in graph.node:
        users = readers.get(pad.output[0], []) if pad.op_type == "Pad" else []
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != pad.output[0]:
            continue
        conv = users[0]
        amounts = _zero_pad_amounts(pad, inits)
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if amounts is None or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        spatial = len(amounts) // 2 - 2
        begins, ends = amounts[2 : 2 + spatial], amounts[4 + spatial :]
        old = list(attrs.get("pads", [0] * (2 * spatial)))
        pads = [a + b for a, b in zip(old, begins + ends, strict=True)]
        for attribute in list(conv.attribute):
            if attribute.name == "pads":
                conv.attribute.remove(attribute)
        conv.attribute.append(helper.make_attribute("pads", pads))
        conv.input[0] = pad.input[0]
        folded.add(id(pad))
    kept = [n for n in graph.node if id(n) not in folded]
    del graph.node[:]
    graph.node.extend(kept)
    return len(folded)


def _zero_pad_amounts(pad: Any, inits: dict[str, Any]) -> list[int] | None:
    """The Pad's amounts when it pads spatial dimensions only, with zeros, by constant amounts."""
    from onnx import numpy_helper

    mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
    if mode != "constant" or len(pad.input) < 2 or pad.input[1] not in inits:
        return None
    if len(pad.input) > 3 and pad.input[3]:  # `axes` (opset 18): not produced by the tracer
        return None
    if len(pad.input) > 2 and pad.input[2]:
        value = inits.get(pad.input[2])
        if value is None or np.any(numpy_helper.to_array(value) != 0):
            return None
    amounts = [int(v) for v in numpy_helper.to_array(inits[pad.input[1]]).ravel()]
    rank = len(amounts) // 2
    batch_channel = amounts[:2] + amounts[rank : rank + 2]
    if rank < 3 or any(batch_channel) or min(amounts) < 0:
        return None
    return amounts


def consumers(graph: Any) -> dict[str, list[Any]]:
    """Each tensor name -> the nodes that read it."""
    out: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def prune_initializers(graph: Any) -> None:
    """Drop initializers no node reads (the float weights the markers replaced)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dropped = {t.name for t in graph.initializer if t.name not in used}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph_inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(graph_inputs)
