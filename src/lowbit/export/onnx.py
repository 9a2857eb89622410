"""`export_onnx`: a lowbit-quantized (simulated) model to an ONNX QDQ file.

How: `_exporters` traces the model with a `lowbit::Quant` marker where each quantizer of each
`QuantModule` acts (the TorchScript exporter by default; the dynamo one is ready, see
docs/export.md), so the markers land exactly where the simulation quantizes, inside subclassed
layers too. Then `_graph` turns each marker into integer initializer -> DequantizeLinear
(weights, with codes from `lowbit.numerics.quantize`, bit-exact with the simulation) or
QuantizeLinear -> DequantizeLinear (activations), `_targets` writes the target runtime's form,
and the file is checked and written atomically. onnx is imported here only, never by
`import lowbit`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lowbit._atomic import write_atomic
from lowbit.config import LayerQuant, QuantConfig
from lowbit.distributed import check_unsharded, on_rank_zero
from lowbit.export import _exporters, _graph
from lowbit.export._exporters import (
    TORCHSCRIPT_MAX_OPSET,
    Exporter,
    export_graph,
    exporter_opset,
)
from lowbit.export._sites import (
    INT16,
    MAX_OPSET,
    MIN_OPSET,
    UINT16,
    Site,
    activation_site,
    needs_opset_21,
    weight_site,
)
from lowbit.export._targets import DEFAULT_TARGET, check_target, retarget
from lowbit.export._trace import (
    DynamicAxes,
    KeywordCall,
    as_inputs,
    eval_mode,
    needed_opset,
    signature,
    strip_prefix,
)
from lowbit.nn.binary_act import CenteredSign
from lowbit.nn.input_scale import InputScale
from lowbit.nn.modules import QuantModule, quant_modules
from lowbit.nn.op_points import OpPoints, op_points
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.spec import QuantSpec


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    reduce_range: bool = False,
    dynamic_axes: DynamicAxes | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    target: str = DEFAULT_TARGET,
    every_rank: bool = False,
) -> Path:
    """Export a model from `lowbit.quantize` (or `prepare_qat`) to ONNX with Q/DQ nodes.

    Weights become integer initializers (int8; INT4 for 4-bit, binary and ternary weights at
    opset 21; int16 above 8 bits) read by a per-axis (per-channel) or blocked (per-group)
    DequantizeLinear. Each quantized input or output becomes QuantizeLinear -> DequantizeLinear
    (uint8 for affine specs, int8 for symmetric) directly before the op that consumes it. The
    file runs in ONNX Runtime, OpenVINO and TensorRT and matches the simulation: weights bit for
    bit, activations to within float rounding.

    example_inputs: a tensor, a tuple of tensors, a dict of keyword inputs (Hugging Face's
        `{"input_ids": ..., "attention_mask": ...}`), or positional tensors (or an args tuple)
        followed by such a dict. The graph's inputs are named after the keys, positional ones
        "input" ("input_0", ... for several); outputs after the keys of a dict output
        (`last_hidden_state`, ...), else "output" ("output_0", ...).
    opset: 13 to 21. Default: the lowest that works, 13, or 21 where the model needs INT4 /
        int16 / blocked scales, or what an operator of the graph needs (14 for
        `scaled_dot_product_attention`). An opset too old for an operator is a ValueError
        naming both.
    reduce_range: require 7-bit weight codes (within [-64, 63]) for CPUs without VNNI, where
        u8 x s8 products can saturate; quantize with `reduce_range_config(config)` first so the
        simulation uses the same codes (export never changes the numbers silently).
    dynamic_axes: torch.onnx.export's form, `{name: {dim: label}}` or `{name: [dims]}`; the
        other dimensions are fixed. Default: dim 0 of every input and output is "batch", and
        dim 1 of token inputs (2-D int64 / int32 tensors) "sequence" (the exporter leaves the
        outputs' other dims symbolic). `{}` fixes every shape.

    target: the runtime the file is for, "onnxruntime" (default), "openvino" or "tensorrt".
        The numbers are the same; the form is the one that runtime runs fast. For ONNX Runtime
        signed 8-bit activations are written as uint8 with the zero point moved by 128 (its x86
        kernels are u8 x s8), and a Relu / Clip between a layer and its QuantizeLinear becomes a
        Clip of the codes after it, so the layer fuses into QLinearConv / QLinearMatMul.
        OpenVINO and TensorRT get int8 activations with zero point 0 as traced (TensorRT
        requires it: affine activations are a ValueError for it). See docs/export.md.

    The model runs in eval mode (dropout off) while exporting; every submodule's own mode is
    restored afterwards. Under torch.distributed rank 0 alone writes, unless `every_rank=True`.

    Raises ValueError / NotImplementedError naming the module and the quantizer for what ONNX
    cannot express (log2 schemes, per-group or dynamic activation quantizers, converted integer
    modules). Writes to a temporary name, then renames: a failed export leaves no file.
    """
    import onnx

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    runtime = check_target(target)
    inputs = as_inputs(example_inputs)
    out = Path(path)
    quantized = _quant_modules(model)
    ops = _op_quantizers(model)
    explicit = opset is not None
    exporter = _exporters.DEFAULT_EXPORTER
    opset = exporter_opset(exporter, _choose_opset(quantized, ops, opset), explicit)
    sites = _collect_sites(quantized, ops, opset, reduce_range)  # checks them before any forward

    with eval_mode(model):
        call = KeywordCall(model, len(inputs.args), list(inputs.kwargs)).eval()
        names = signature(call, inputs, input_names, output_names, dynamic_axes)
        if opset != (opset := _operator_opset(exporter, names.functions, opset, explicit)):
            sites = _collect_sites(quantized, ops, opset, reduce_range)
        traced = export_graph(exporter, call, inputs.tensors, names, opset, quantized, sites)
    proto = onnx.load_from_string(traced)
    strip_prefix(proto.graph, "model.")
    _rewrite(proto, sites, opset, reduce_range, runtime)
    onnx.checker.check_model(proto, full_check=True)
    on_rank_zero(lambda: write_atomic(out, proto.SerializeToString()), every_rank=every_rank)
    return out


def reduce_range_config(config: QuantConfig) -> QuantConfig:
    """A copy of `config` whose weights use 7-bit codes (ONNX Runtime's `reduce_range`).

    Quantize with it, then export with `reduce_range=True`: the simulation and the file then use
    the same [-64, 63] weights (narrow-range specs: [-63, 63]).
    """

    def seven(spec: QuantSpec | None) -> QuantSpec | None:
        if spec is None or spec.scheme != "uniform" or spec.bits <= 7:
            return spec
        return spec.with_(bits=7)

    overrides: dict[Any, LayerQuant | None] = {
        k: None if v is None else replace(v, weight=seven(v.weight))
        for k, v in config.overrides.items()
    }
    return replace(config, weight=seven(config.weight), overrides=overrides)


def _operator_opset(
    exporter: Exporter, functions: frozenset[str], opset: int, explicit: bool
) -> int:
    """`opset`, or the newer one an operator of the model needs in the TorchScript exporter (an
    error if it was explicit); the dynamo exporter's opsets (18+) have every operator here."""
    if exporter == "dynamo":
        return opset
    needed = needed_opset(functions, min(opset, TORCHSCRIPT_MAX_OPSET))
    if needed is None:
        return opset
    op, version = needed
    if version > TORCHSCRIPT_MAX_OPSET:
        raise NotImplementedError(
            f"the model uses {op}, which the TorchScript exporter writes from opset {version} "
            f"only, above its newest ({TORCHSCRIPT_MAX_OPSET})"
        )
    if explicit:
        raise ValueError(
            f"opset={opset} cannot express this model: {op} needs opset {version} or newer; "
            f"pass opset={version}, or leave opset unset to get the lowest opset that works"
        )
    return version


def _quant_modules(model: nn.Module) -> dict[str, QuantModule]:
    """`quant_modules(model)`, after checking that every quantizer and lowbit module in the model
    is one the export can write (none outside a QuantModule or OpPoints, no converted module,
    no FSDP2 shards)."""
    check_unsharded(model, "lowbit.export_onnx")
    quantized = quant_modules(model)
    points = op_points(model)
    inside = {id(q) for m in quantized.values() for q in m.quantizers().values()}
    inside.update(id(q) for p in points.values() for q in p.values())
    wrapped = {id(m.module) for m in quantized.values()}
    for name, m in model.named_modules():
        kind = type(m)
        if isinstance(m, TensorQuantizer) and id(m) not in inside:
            raise NotImplementedError(
                f"module {name!r}: a {kind.__name__} outside a QuantModule (a converted or "
                "hand-built layer) cannot be exported; export the simulated model from "
                "lowbit.quantize, before lowbit.convert"
            )
        lowbit_type = kind.__module__.startswith("lowbit.nn.") and not isinstance(
            m, QuantModule | TensorQuantizer | OpPoints | InputScale
        )
        if lowbit_type and id(m) not in wrapped:
            raise NotImplementedError(
                f"module {name!r}: {kind.__name__} (a converted integer module) cannot be "
                "exported; export the simulated model from lowbit.quantize, before convert"
            )
    if not quantized and not points:
        raise ValueError(
            "the model has no quantized layer (QuantModule) or functional op: quantize it with "
            "lowbit.quantize first, or export the float model with torch.onnx.export"
        )
    return quantized


def _active(q: TensorQuantizer | None) -> bool:
    return q is not None and q.mode != "off"


def _op_quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """The active functional-op output quantizers by point name (`blocks.3.add_0`)."""
    return {
        points.point(local): q
        for points in op_points(model).values()
        for local, q in points.quantizers().items()
        if _active(q)
    }


def _choose_opset(
    quantized: dict[str, QuantModule], ops: dict[str, TensorQuantizer], opset: int | None
) -> int:
    needed = any(
        needs_opset_21(q.spec, role)
        for m in quantized.values()
        for role, q in m.quantizers().items()
        if _active(q)
    ) or any(needs_opset_21(q.spec, "output") for q in ops.values())
    if opset is None:
        return MAX_OPSET if needed else MIN_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {opset!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"opset must be {MIN_OPSET} (per-axis DequantizeLinear) to {MAX_OPSET}, got {opset}"
        )
    return opset


def _collect_sites(
    quantized: dict[str, QuantModule],
    ops: dict[str, TensorQuantizer],
    opset: int,
    reduce_range: bool,
) -> dict[str, Site]:
    sites: dict[str, Site] = {}
    for name, q in ops.items():
        site = activation_site(name, "output", q, opset)
        sites[site.key] = site
    for name, m in quantized.items():
        for role, q in m.quantizers().items():
            # a centred binary / ternary activation exports as its own float ops (Sub, Greater,
            # Where): no QuantizeLinear form, every runtime runs them
            if not _active(q) or isinstance(q, CenteredSign):
                continue
            if role == "weight":
                weight = m.module.weight
                assert isinstance(weight, Tensor)
                site = weight_site(name, weight, q, int4=opset >= 21, reduce_range=reduce_range)
                if opset < 21 and (site.block_size or site.elem in (INT16, UINT16)):
                    what = "per-group scales" if site.block_size else f"{q.spec.bits}-bit codes"
                    raise ValueError(
                        f"module {name!r} (weight quantizer): {what} need opset 21 "
                        f"(blocked / int16 DequantizeLinear), got opset {opset}"
                    )
            else:
                site = activation_site(name, role, q, opset)
            sites[site.key] = site
    return sites


def _rewrite(
    proto: Any, sites: dict[str, Site], opset: int, reduce_range: bool, target: str
) -> None:
    from onnx import helper

    graph = proto.graph
    traced_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    _graph.fold_constants(graph, traced_opset)
    _graph.replace_markers(graph, sites)
    _graph.fold_zero_pad_into_conv(graph)
    retarget(graph, target)
    _graph.prune_initializers(graph)
    del proto.opset_import[:]
    proto.opset_import.append(helper.make_opsetid("", opset))
    if opset >= 21:
        proto.ir_version = max(proto.ir_version, 10)
    proto.producer_name = "lowbit"
    helper.set_model_props(
        proto,
        {
            "lowbit.qdq": "1",
            "lowbit.reduce_range": str(reduce_range).lower(),
            "lowbit.target": target,
        },
    )
