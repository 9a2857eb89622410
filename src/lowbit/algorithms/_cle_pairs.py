"""Which layer feeds which: the layer pairs cross-layer equalization can rescale.

Read from one traced forward pass (`lowbit.transforms.trace`), because real models wire their
layers in custom forward code (EfficientNet calls one shared ReLU6 module three times per
block), not in an nn.Sequential. Layers, activations, BatchNorms and leaf modules are opaque:
the calls inside them are not looked at. A pair is used only when the first layer's output goes
to nothing but the activation (or directly to the second layer) and the activation's output to
nothing but the second layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

from lowbit.transforms.fold_bn import BN_TYPES, PRODUCER_TYPES
from lowbit.transforms.trace import Call, Trace, Value

__all__ = ["Act", "Relu6Mode", "find_pairs"]

Relu6Mode = Literal["bounded", "skip"]

EQ_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
_ACT_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.Hardtanh)


@dataclass(frozen=True)
class Act:
    """An activation between two layers: "relu" (scale-equivariant) or "clip" at `clip`."""

    kind: Literal["none", "relu", "clip"]
    clip: float | None = None
    name: str = ""


@dataclass
class _Node:
    """A value in the traced forward pass: a layer's output or an activation's output."""

    producer: str
    act: Act | None = None
    # ("module", name, sole first input) | ("act", node index) | ("function", name)
    consumers: list[tuple[str, Any, bool]] = field(default_factory=list)


@dataclass
class _Graph:
    """The nodes of the pass, the node each tensor (by Value id) belongs to, and how often each
    opaque module ran outside other opaque modules."""

    nodes: list[_Node] = field(default_factory=list)
    node_of: dict[int, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, value: Value, node: _Node) -> int:
        self.nodes.append(node)
        self.node_of[value.id] = len(self.nodes) - 1
        return len(self.nodes) - 1

    def use(self, values: Iterable[Value], consumer: tuple[str, Any, bool]) -> None:
        for v in values:
            if v.id in self.node_of:
                self.nodes[self.node_of[v.id]].consumers.append(consumer)

    def source(self, call: Call) -> int | None:
        """The node of the call's first positional argument, if it has one."""
        first = call.first
        return None if first is None else self.node_of.get(first.id)


def _graph(model: nn.Module, seen: Trace) -> _Graph:
    """Nodes and their consumers from the calls made outside any opaque module."""
    modules = dict(model.named_modules())
    graph = _Graph()
    for call in seen.calls:
        if any(_opaque(modules[s]) for s in call.scope):
            continue
        if call.module is None:
            _function_call(graph, call)
        elif _opaque(modules[call.module]):
            _module_call(graph, call, modules[call.module])
    return graph


def _function_call(graph: _Graph, call: Call) -> None:
    act = _function_act(call.op, call.args, call.kwargs)
    source = graph.source(call)
    if act is None or source is None:
        graph.use(call.inputs, ("function", call.op, False))
    elif call.output is not None:
        index = graph.add(call.output, _Node(producer=call.op, act=act))
        graph.nodes[source].consumers.append(("act", index, False))
        graph.use(call.inputs[1:], ("function", call.op, False))  # all but the activated one


def _module_call(graph: _Graph, call: Call, module: nn.Module) -> None:
    name = call.module
    assert name is not None
    graph.calls[name] = graph.calls.get(name, 0) + 1
    act = _module_act(module)
    if not isinstance(module, _PASS_THROUGH) and act is None:
        first = call.first
        sole = len(call.inputs) == 1 and first is not None and call.inputs[0] == first
        graph.use(call.inputs, ("module", name, sole))
    output, source = call.output, graph.source(call)
    if output is None:
        return
    if isinstance(module, _PASS_THROUGH):
        if source is not None:
            graph.node_of[output.id] = source
    elif act is not None:
        if source is None:
            return
        if len(call.inputs) != 1:
            graph.use(call.inputs, ("module", name, False))
            return
        index = graph.add(output, _Node(producer=name, act=act))
        graph.nodes[source].consumers.append(("act", index, False))
    elif isinstance(module, EQ_LAYERS):
        graph.add(output, _Node(producer=name))


def _module_act(module: nn.Module) -> Act | None:
    if isinstance(module, nn.ReLU | nn.LeakyReLU):
        return Act("relu", None, type(module).__name__)
    if isinstance(module, nn.Hardtanh) and module.min_val == 0.0:
        return Act("clip", float(module.max_val), type(module).__name__)
    return None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _function_act(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Act | None:
    """The activation a torch function call applies, from its name and bounds (None if none
    or not one CLE can pass through)."""
    if name in ("relu", "relu_", "leaky_relu", "leaky_relu_"):
        return Act("relu", None, name)
    if name == "relu6":
        return Act("clip", 6.0, name)
    if name in ("hardtanh", "hardtanh_"):
        lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    elif name in ("clamp", "clamp_", "clip", "clip_"):
        lo, hi = _arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)
    elif name in ("clamp_min", "clamp_min_"):
        lo, hi = _arg(args, kwargs, 1, "min", None), None
    else:
        return None
    if not isinstance(lo, int | float) or lo != 0:
        return None
    if hi is None:
        return Act("relu", None, name)
    if isinstance(hi, int | float) and hi > 0:
        return Act("clip", float(hi), name)
    return None


def _opaque(module: nn.Module) -> bool:
    """Modules whose insides the trace does not look into (layers, activations, leaves)."""
    known = (*EQ_LAYERS, *PRODUCER_TYPES, *_ACT_MODULES, *_PASS_THROUGH, *BN_TYPES)
    return isinstance(module, known) or not any(True for _ in module.children())


def _channels(module: nn.Module, side: Literal["in", "out"]) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features if side == "in" else module.out_features
    return int(module.in_channels if side == "in" else module.out_channels)  # type: ignore[arg-type]


def _same_family(a: nn.Module, b: nn.Module) -> bool:
    """Both Linear, or both convolutions of the same dimensionality (channels on axis 1)."""
    wa, wb = a.weight, b.weight
    assert isinstance(wa, Tensor) and isinstance(wb, Tensor)
    return isinstance(a, nn.Linear) == isinstance(b, nn.Linear) and wa.dim() == wb.dim()


def find_pairs(
    model: nn.Module, seen: Trace, relu6: Relu6Mode
) -> tuple[list[tuple[str, str, Act]], list[tuple[str, str, str]]]:
    """The (first, second, activation) pairs of a traced pass that equalization can rescale,
    and the (first, second, why) pairs it cannot although they are wired as one."""
    graph = _graph(model, seen)
    modules = dict(model.named_modules())
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    pairs: list[tuple[str, str, Act]] = []
    skipped: list[tuple[str, str, str]] = []
    for node in graph.nodes:
        if node.act is not None or len(node.consumers) != 1:
            continue
        kind, target, sole = node.consumers[0]
        act = Act("none")
        if kind == "act":
            act_node = graph.nodes[target]
            assert act_node.act is not None
            act = act_node.act
            if len(act_node.consumers) != 1:
                continue
            kind, target, sole = act_node.consumers[0]
        if kind != "module" or not sole:
            continue
        first, second = node.producer, str(target)
        m1, m2 = modules.get(first), modules.get(second)
        if not isinstance(m1, EQ_LAYERS) or not isinstance(m2, EQ_LAYERS) or m1 is m2:
            continue
        if not _same_family(m1, m2) or _channels(m1, "out") != _channels(m2, "in"):
            continue
        if graph.calls.get(first) != 1 or graph.calls.get(second) != 1:
            skipped.append((first, second, "a layer runs more than once per forward"))
            continue
        if counts[id(m1)] != 1 or counts[id(m2)] != 1:
            skipped.append((first, second, "a layer is registered under several names"))
            continue
        if not all(isinstance(getattr(m, "weight", None), nn.Parameter) for m in (m1, m2)):
            continue
        if act.kind == "clip" and relu6 == "skip":
            skipped.append((first, second, f"{act.name} clips (relu6='skip')"))
            continue
        pairs.append((first, second, act))
    return pairs, skipped
