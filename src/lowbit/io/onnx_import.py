"""ONNX models brought into PyTorch so that their convolutions reach lowbit's integer kernels.

An exported 'SAME' padding (TensorFlow-style models, EfficientNet) is a `Pad` node in front of a
`Conv`, its amounts computed by a chain of small constant ops. Converted as it is (onnx2torch),
every such layer pads a float tensor at run time and the integer convolution cannot take the pad
into its quantize step. Before conversion, `fold_zero_pads` evaluates those constants and moves
each zero `Pad` into its `Conv`'s own pads; after conversion, `padded_convolutions` turns what
onnx2torch builds for an asymmetric conv padding (a pad module, then the conv) into one
`ZeroPaddedConv2d`, which the converted int8 convolution pads in its quantize step, as for a
native model.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from torch import nn

from lowbit.nn.padded_conv import ZeroPaddedConv2d


def fold_zero_pads(proto: Any) -> int:
    """Fold every zero-valued constant `Pad` whose only consumer is a `Conv`'s input into that
    Conv's pads, in place; returns how many were folded. Nodes left unused are removed."""
    graph = proto.graph
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in graph.output}
    folded = 0
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        users = consumers[pad.output[0]]
        if pad.output[0] in outputs or len(users) != 1 or users[0].op_type != "Conv":
            continue
        conv = users[0]
        amounts = _zero_pad_amounts(proto, pad)
        if conv.input[0] != pad.output[0] or amounts is None or not _fold_into(conv, amounts):
            continue
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
        folded += 1
    _remove_unused_nodes(graph)
    return folded


def _zero_pad_amounts(proto: Any, pad: Any) -> list[int] | None:
    """The Pad's amounts (ONNX order: all begins, then all ends) if it pads with the constant 0
    and its amounts and value are constants; else None."""
    attributes = {a.name: a for a in pad.attribute}
    mode = attributes["mode"].s.decode() if "mode" in attributes else "constant"
    if mode != "constant" or len(pad.input) > 3:  # opset 18's `axes` input: not folded
        return None
    if "pads" in attributes:  # opset < 11
        value = attributes["value"].f if "value" in attributes else 0.0
        return list(attributes["pads"].ints) if value == 0.0 else None
    amounts = _constant(proto, pad.input[1])
    value = _constant(proto, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0.0
    if amounts is None or value is None or np.any(np.asarray(value) != 0):
        return None
    return [int(a) for a in amounts.reshape(-1)]


def _fold_into(conv: Any, amounts: list[int]) -> bool:
    """Add the spatial pad `amounts` to the Conv's pads; False (Conv untouched) when the pad
    touches the batch or channel axes, is negative (a crop), or the Conv pads automatically."""
    rank = len(amounts) // 2
    begins, ends = amounts[:rank], amounts[rank:]
    attributes = {a.name: a for a in conv.attribute}
    auto_pad = attributes["auto_pad"].s.decode() if "auto_pad" in attributes else "NOTSET"
    if rank < 3 or any(begins[:2]) or any(ends[:2]) or min(amounts) < 0 or auto_pad != "NOTSET":
        return False
    spatial = rank - 2
    current = list(attributes["pads"].ints) if "pads" in attributes else [0] * (2 * spatial)
    new = [p + a for p, a in zip(current, [*begins[2:], *ends[2:]], strict=True)]
    if "pads" in attributes:
        conv.attribute.remove(attributes["pads"])
    from onnx import helper

    conv.attribute.append(helper.make_attribute("pads", new))
    return True


def _constant(proto: Any, name: str) -> np.ndarray | None:
    """The value of tensor `name` if it depends only on initializers and Constant nodes,
    evaluated with onnx's reference implementation; None otherwise."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    producers = {out: node for node in graph.node for out in node.output}
    needed: list[Any] = []
    used_initializers: dict[str, Any] = {}
    pending = [name]
    while pending:
        tensor = pending.pop()
        if tensor in initializers:
            used_initializers[tensor] = initializers[tensor]
        elif tensor in producers:
            node = producers[tensor]
            if all(node is not n for n in needed):
                needed.append(node)
                pending.extend(i for i in node.input if i)
        elif tensor:
            return None  # a graph input: not a constant
    order = [n for n in graph.node if any(n is m for m in needed)]
    sub = helper.make_graph(
        order, "constant", [], [helper.make_empty_tensor_value_info(name)],
        list(used_initializers.values()),
    )  # fmt: skip
    model = helper.make_model(sub, opset_imports=list(proto.opset_import))
    try:
        (value,) = ReferenceEvaluator(model).run(None, {})
        return np.asarray(value)
    except Exception:  # an op the reference implementation lacks: leave the Pad as it is
        return None


def _remove_unused_nodes(graph: Any) -> None:
    """Drop nodes none of whose outputs is used (the constant chains of folded Pads)."""
    while True:
        used = {name for node in graph.node for name in node.input}
        used.update(o.name for o in graph.output)
        dead = [n for n in graph.node if not any(out in used for out in n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def padded_convolutions(model: nn.Module) -> int:
    """Replace onnx2torch's `Sequential(pad with zeros, Conv2d)` by one `ZeroPaddedConv2d`, in
    place; returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            padded = _as_padded_conv(child)
            if padded is not None:
                setattr(parent, child_name, padded)
                replaced += 1
    return replaced


def _as_padded_conv(module: nn.Module) -> ZeroPaddedConv2d | None:
    if not isinstance(module, nn.Sequential) or len(module) != 2:
        return None
    pad, conv = module[0], module[1]
    if type(pad).__name__ != "OnnxPadStatic" or type(conv) is not nn.Conv2d:
        return None
    settings: dict[str, Any] = vars(pad)  # onnx2torch's plain attributes: pads, mode, value
    pads = [int(p) for p in settings["pads"]]
    if settings["mode"] != "constant" or float(settings["constant_value"]) != 0.0:
        return None
    if len(pads) != 4:
        return None
    return ZeroPaddedConv2d.wrap(conv, (pads[0], pads[1], pads[2], pads[3]))
