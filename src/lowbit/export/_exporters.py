"""The one place that calls `torch.onnx.export`: the model traced with a marker at each site.

For the length of the export every quantizer of every `QuantModule` is swapped for a stub whose
forward is lowbit's own simulation and whose ONNX form is one `lowbit::Quant` node; `_graph`
then turns each marker into Q/DQ nodes. Two exporters can trace it:

- "torchscript" (the default, `dynamo=False`): the marker is an autograd.Function with an ONNX
  symbolic. Deprecated in torch, but it writes every opset from 13.
- "dynamo" (`dynamo=True`, needs `onnxscript`): the marker is a torch custom op that a custom
  translation writes as the same node. It writes opset 18 and newer only (its converter to
  older opsets fails on Shape and Reshape). See docs/export.md for what was measured.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lowbit.export import _graph
from lowbit.export._sites import Site
from lowbit.export._trace import KeywordCall, Signature
from lowbit.nn.modules import QuantModule
from lowbit.nn.op_points import OpPoints, op_points
from lowbit.nn.quantizer import TensorQuantizer

Exporter = Literal["torchscript", "dynamo"]
EXPORTERS: tuple[Exporter, ...] = ("torchscript", "dynamo")
DEFAULT_EXPORTER: Exporter = "torchscript"
TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter's newest; 21 only adds INT4 and blocks
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's oldest that it writes without conversion
_ACTIVE: dict[str, Site] = {}  # the sites of the export in progress, read by the markers


def exporter_opset(exporter: Exporter, opset: int, explicit: bool) -> int:
    """The opset the file is written at with `exporter`: `opset`, or the dynamo exporter's
    oldest when `opset` was a default below it (an explicit one below it is a ValueError)."""
    if exporter == "torchscript" or opset >= DYNAMO_MIN_OPSET:
        return opset
    if explicit:
        raise ValueError(
            f"opset={opset}: the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or newer; "
            f"pass opset={DYNAMO_MIN_OPSET} or more, or use the TorchScript exporter"
        )
    return DYNAMO_MIN_OPSET


def export_graph(
    exporter: Exporter,
    call: KeywordCall,
    tensors: tuple[Tensor, ...],
    names: Signature,
    opset: int,
    quantized: dict[str, QuantModule],
    sites: dict[str, Site],
) -> bytes:
    """The serialized ONNX graph of the model from `exporter`, a marker node at each site."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    dynamo = exporter == "dynamo"
    options: dict[str, Any]
    if dynamo:
        options = {
            "opset_version": opset,
            "dynamic_shapes": _dynamic_shapes(names),
            "custom_translation_table": _dynamo_translation(),
            "verbose": False,
        }
    else:
        options = {
            "opset_version": min(opset, TORCHSCRIPT_MAX_OPSET),
            "dynamic_axes": names.dynamic_axes,
            "custom_opsets": {_graph.MARKER_DOMAIN: 1},
        }
    buffer = io.BytesIO()
    stub = _DynamoStub if dynamo else _TorchScriptStub
    with (
        _stubs(quantized, sites, stub),
        _op_stubs(call, sites, stub),
        warnings.catch_warnings(),
        _quiet_logs(),
    ):
        warnings.simplefilter("ignore")  # tracer and exporter deprecation notes
        program = torch.onnx.export(
            call,
            tensors,
            None if dynamo else buffer,  # type: ignore[arg-type]
            dynamo=dynamo,
            input_names=names.input_names,
            output_names=names.output_names,
            **options,
        )
    if program is None:
        return buffer.getvalue()
    proto = program.model_proto
    _name_dynamic_dims(proto.graph, names)
    data: bytes = proto.SerializeToString()
    return data


class _Marker(torch.autograd.Function):
    """Identity-to-the-simulation in eager mode; one `lowbit::Quant` node in the TorchScript
    exporter's trace."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, key: str) -> Tensor:
        return _ACTIVE[key].simulate(x)

    @staticmethod
    def symbolic(g: Any, x: Any, key: str) -> Any:
        out = g.op(f"{_graph.MARKER_DOMAIN}::{_graph.MARKER_OP}", x, key_s=key)
        out.setType(x.type())
        return out


class _TorchScriptStub(nn.Module):
    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = _Marker.apply(x, self.key)
        return out


@contextmanager
def _stubs(
    quantized: dict[str, QuantModule], sites: dict[str, Site], stub: Callable[[str], nn.Module]
) -> Iterator[None]:
    """Swap quantizers for markers; put everything back afterwards.

    `functional_call` refuses to run under the tracer, so a weight marker is a parametrization
    of the wrapped layer's weight (computed at each access, inside the layer's own forward) and
    the QuantModule's weight quantizer is unset meanwhile.
    """
    saved: list[tuple[QuantModule, str, TensorQuantizer]] = []
    parametrized: list[nn.Module] = []
    _ACTIVE.clear()
    _ACTIVE.update(sites)
    try:
        for name, m in quantized.items():
            for role, q in m.quantizers().items():
                key = f"{name}.{role}"
                if key not in sites:
                    continue
                attr = f"{role}_quantizer"
                saved.append((m, attr, q))
                if role == "weight":
                    setattr(m, attr, None)
                    parametrize.register_parametrization(m.module, "weight", stub(key), unsafe=True)
                    parametrized.append(m.module)
                else:
                    setattr(m, attr, stub(key))
        yield
    finally:
        for layer in parametrized:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        for m, attr, q in saved:
            setattr(m, attr, q)
        _ACTIVE.clear()


@contextmanager
def _op_stubs(
    model: nn.Module, sites: dict[str, Site], stub: Callable[[str], nn.Module]
) -> Iterator[None]:
    """Swap functional-op output quantizers (`lowbit.nn.op_points`) for markers meanwhile."""
    saved: list[tuple[OpPoints, str, TensorQuantizer]] = []
    try:
        for points in op_points(model).values():
            for local, q in points.quantizers().items():
                key = f"{points.point(local)}.output"
                if key in sites:
                    saved.append((points, local, q))
                    points[local] = stub(key)
        yield
    finally:
        for points, local, q in saved:
            points[local] = q


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """The exporters log notes (missing torchvision, opset conversion) at WARNING: hidden."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dynamic_shapes(names: Signature) -> tuple[tuple[Any, ...]]:
    """`names.dynamic_axes` as torch.export's `dynamic_shapes` of `KeywordCall(*tensors)`."""
    from torch.export import Dim

    axes = [names.dynamic_axes.get(name, {}) for name in names.input_names]
    return (tuple({dim: Dim.DYNAMIC for dim in dims} or None for dims in axes),)


def _name_dynamic_dims(graph: Any, names: Signature) -> None:
    """Label the dynamic dims of the graph's inputs and outputs as `dynamic_axes` says
    (torch.export names them s0, s1, ...)."""
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        for dim, label in names.dynamic_axes.get(value.name, {}).items():
            if dim < len(dims):
                dims[dim].dim_param = label


class _DynamoStub(nn.Module):
    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = torch.ops.lowbit_export.marker.default(x, self.key)
        return out


@functools.cache
def _dynamo_translation() -> dict[Any, Callable[..., Any]]:
    """The marker as a torch custom op (`lowbit_export::marker`, registered once per process)
    and its onnxscript translation to one `lowbit::Quant` node."""
    from onnx.defs import OpSchema

    try:
        from onnxscript import values
    except ImportError as error:
        raise ImportError("the dynamo exporter needs onnxscript: pip install onnxscript") from error

    @torch.library.custom_op("lowbit_export::marker", mutates_args=())
    def marker(x: Tensor, key: str) -> Tensor:
        return _ACTIVE[key].simulate(x)

    @marker.register_fake
    def _(x: Tensor, key: str) -> Tensor:
        return torch.empty_like(x)

    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    schema = OpSchema(
        _graph.MARKER_OP,
        _graph.MARKER_DOMAIN,
        1,
        inputs=[OpSchema.FormalParameter("x", "T")],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", floats, "")],
        attributes=[OpSchema.Attribute("key", OpSchema.AttrType.STRING, "")],
    )
    quant = values.Op(values.Opset(_graph.MARKER_DOMAIN, 1), _graph.MARKER_OP, schema)

    def to_onnx(x: Any, key: str) -> Any:
        return quant(x, key=key)

    return {torch.ops.lowbit_export.marker.default: to_onnx}
