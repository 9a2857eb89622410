"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1).

Two layers joined by a positively scale-equivariant activation, y = W2 f(W1 x + b1) + b2 with
f(s x) = s f(x) for s > 0 (ReLU, LeakyReLU, no activation), compute the same function after output
channel i of the first layer is divided by s_i and input channel i of the second is multiplied by
s_i. Choosing s_i = sqrt(r1_i / r2_i), where r1_i is the weight range of output channel i of W1 and
r2_i that of input channel i of W2, makes both ranges sqrt(r1_i r2_i): channels whose weights were
tiny next to the layer's largest channel (typical after BatchNorm folding of a depthwise
convolution) stop being crushed to zero by a per-tensor weight scale. Chains of three (conv ->
depthwise -> conv, as in MobileNet and EfficientNet) are equalized pairwise, in turns, until the
scales stop changing.

ReLU6 (and Hardtanh(0, c), clamp(0, c)) clip at c and are not scale-equivariant: relu6(x / s)
differs from relu6(x) / s wherever x > 6 (or x / s > 6). The paper replaced ReLU6 by ReLU, which
changes the model. `equalize` keeps the model's function instead (`relu6="bounded"`, default): it
measures each first-layer channel's largest pre-activation value m_i over the calibration data;
a channel that reaches the clip (m_i > c) keeps s_i = 1, and every other channel gets
s_i >= m_i / c, so that its values stay below the clip after scaling too. On the calibration
data the clip is then never active on a rescaled channel and outputs are unchanged to float
rounding (this is checked on the first batch, and the model restored if not); inputs far outside
the calibration range can still differ. `relu6="skip"` leaves such pairs alone.

The pairs are found by tracing one forward pass with module hooks and a torch function mode, as
BatchNorm folding does: real models wire their layers in custom forward code (EfficientNet calls
one shared ReLU6 module three times per block), not in an nn.Sequential. A pair is used only when
the first layer's output goes to nothing but the activation (or directly to the second layer) and
the activation's output to nothing but the second layer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lowbit.batches import (
    Forward,
    check_batch,
    first_batch,
    outputs_match,
    run_batch,
    run_user_batch,
    tensors_of,
)
from lowbit.config import QuantConfig, weight_spec_for
from lowbit.nn.modules import QuantModule
from lowbit.spec import PerChannel, PerGroup
from lowbit.transforms.fold_bn import (
    PRODUCER_TYPES,
    flatten_outputs,
    fold_batchnorm,
    is_metadata,
)

__all__ = ["EqualizationReport", "EqualizedPair", "equalize"]

Relu6Mode = Literal["bounded", "skip"]
_RELU6_MODES = ("bounded", "skip")

_EQ_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
_ACT_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.Hardtanh)
_BN_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
# Largest rescaling allowed per step: keeps a dead channel (range ~0) from producing Inf.
_MAX_SCALE = 1e6


@dataclass(frozen=True)
class _Act:
    """An activation between two layers: "relu" (scale-equivariant) or "clip" at `clip`."""

    kind: Literal["none", "relu", "clip"]
    clip: float | None = None
    name: str = ""


@dataclass(frozen=True)
class EqualizedPair:
    """One equalized pair: `first`'s output channels feed `second` through `activation`.

    frozen_channels: channels left unscaled because they reach the clip of a bounded activation.
    range_ratio_before / after: largest over smallest per-channel weight range of `first`.
    """

    first: str
    second: str
    activation: str
    frozen_channels: int = 0
    range_ratio_before: float = math.nan
    range_ratio_after: float = math.nan


@dataclass(frozen=True)
class EqualizationReport:
    """What `equalize` did; kept on the model as `lowbit_equalization`."""

    pairs: tuple[EqualizedPair, ...]
    skipped: tuple[tuple[str, str, str], ...]
    iterations: int
    folded_batchnorms: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        lines = [
            f"lowbit: equalized {len(self.pairs)} layer pair(s) in {self.iterations} "
            f"iteration(s); folded {len(self.folded_batchnorms)} BatchNorm(s)"
        ]
        for p in self.pairs:
            frozen = (
                f", {p.frozen_channels} channel(s) at the clip kept" if p.frozen_channels else ""
            )
            lines.append(
                f"  {p.first} -> {p.activation} -> {p.second}: weight range ratio of the first "
                f"{p.range_ratio_before:.1f} -> {p.range_ratio_after:.1f}{frozen}"
            )
        for first, second, why in self.skipped:
            lines.append(f"  skipped {first} -> {second}: {why}")
        return "\n".join(lines)


def equalize(
    model: nn.Module,
    calib_data: Iterable[Any],
    *,
    iterations: int = 20,
    relu6: Relu6Mode = "bounded",
    tolerance: float = 1e-4,
    config: QuantConfig | None = None,
    forward: Forward | None = None,
    inplace: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Cross-layer equalization of a float model; returns the equalized model.

    config: the QuantConfig the model will be quantized with. Equalization evens out the
    output-channel weight ranges of a pair's first layer for a shared (per-tensor) scale; where
    `config` gives that layer a scale per output channel (or leaves its weight in float), its
    weight error is the same at any channel scaling, so the pair is skipped: rescaling would only
    move activation ranges, which can make their per-tensor quantization worse. Without
    `config`, every pair is equalized (per-tensor weights assumed).

    BatchNorm is folded first (with the first batch of `calib_data`), since equalization has to
    see the weights that are actually quantized. `calib_data` (an iterable of batches, as for
    `lowbit.quantize`) also provides the pre-activation ranges for ReLU6-bounded pairs (see the
    module docstring). `iterations` bounds the rounds over all pairs; rounds stop early once no
    scale changes by more than `tolerance` (relative). The result's outputs equal the input
    model's to float rounding on the first batch (checked; on a mismatch the model is left
    unchanged and RuntimeError is raised). `model.lowbit_equalization` says which pairs were
    equalized and how much the weight ranges evened out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise TypeError(
            "model: equalize works on the float model, before lowbit.quantize; this model "
            "already has quantized layers"
        )
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if relu6 not in _RELU6_MODES:
        raise ValueError(f"relu6 must be one of {_RELU6_MODES}, got {relu6!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance!r}")
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config: expected a QuantConfig or None, got {type(config).__name__}")
    example = first_batch(calib_data)
    check_batch(example)
    if model.training:
        raise ValueError("model: is in training mode; call model.eval() first")
    if not inplace:
        model = copy.deepcopy(model)

    def run(m: nn.Module) -> object:
        return run_user_batch(m, example, forward, "calib_data batch 0")

    with torch.no_grad():
        folded = fold_batchnorm(model, run)
        graph = _trace(model, run)
        before = [t.detach().clone() for t in flatten_outputs(graph.output)]
        pairs, skipped = _find_pairs(model, graph, relu6)
        modules = dict(model.named_modules())
        if config is not None:
            why = {first: _cannot_help(first, modules[first], config) for first, _, _ in pairs}
            skipped += [(first, second, why[first]) for first, second, _ in pairs if why[first]]
            pairs = [p for p in pairs if not why[p[0]]]
        maxima = _channel_maxima(
            model, [p for p in pairs if p[2].kind == "clip"], calib_data, forward, progress
        )
        saved = {
            name: (modules[name].weight.detach().clone(), _bias_clone(modules[name]))
            for pair in pairs
            for name in pair[:2]
        }
        ratios_before = {first: _range_ratio(modules[first]) for first, _, _ in pairs}
        frozen: dict[str, int] = {}
        rounds = 0
        for rounds in range(1, iterations + 1):  # noqa: B007 - reported below
            change = 0.0
            for first, second, act in pairs:
                m = maxima.get(first)
                scale, n_frozen = _pair_scale(modules[first], modules[second], act, m)
                _apply(modules[first], modules[second], scale)
                if m is not None:
                    maxima[first] = m / scale
                frozen[first] = n_frozen
                change = max(change, float((scale.log().abs()).max()) if scale.numel() else 0.0)
            if change < tolerance:
                break
        after = [t.detach() for t in flatten_outputs(run(model))]
        if not outputs_match(before, after):
            for name, (weight, bias) in saved.items():
                modules[name].weight.copy_(weight)
                if bias is not None:
                    modules[name].bias.copy_(bias)
            raise RuntimeError(
                "equalize: outputs changed after equalization, so the weights were restored; "
                "a layer's output is probably read in a way the trace could not see. Pairs: "
                f"{[(a, b) for a, b, _ in pairs]}"
            )
    report = EqualizationReport(
        pairs=tuple(
            EqualizedPair(
                first,
                second,
                act.name or act.kind,
                frozen.get(first, 0),
                ratios_before[first],
                _range_ratio(modules[first]),
            )
            for first, second, act in pairs
        ),
        skipped=tuple(skipped),
        iterations=rounds,
        folded_batchnorms=tuple(folded),
    )
    model.lowbit_equalization = report  # type: ignore[assignment]
    return model


# ---------------------------------------------------------------------------------------------
# Scales


def _cannot_help(name: str, module: nn.Module, config: QuantConfig) -> str:
    """Why equalizing a pair that starts at this layer cannot lower its weight error ("" if it
    can): its weight is not quantized, or every output channel has its own scale."""
    layer, _ = config.for_layer(name, module)
    if layer is None or layer.weight is None:
        return f"{name}'s weight stays in float"
    granularity = weight_spec_for(module, layer.weight).granularity
    weight: Tensor = module.weight  # type: ignore[assignment]
    dims = weight.dim()
    # Per channel on axis 0, or groups along the last axis: inside one output channel's row.
    if (isinstance(granularity, PerChannel) and granularity.axis % dims == 0) or (
        isinstance(granularity, PerGroup) and granularity.axis % dims == dims - 1
    ):
        return f"{name} has a weight scale per output channel"
    return ""


def _bias_clone(module: nn.Module) -> Tensor | None:
    bias = module.bias
    return bias.detach().clone() if isinstance(bias, Tensor) else None


def _as_grouped(module: nn.Module) -> tuple[Tensor, int]:
    """The weight viewed as [groups, out per group, in per group, kernel elements]."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    groups = int(getattr(module, "groups", 1))
    out = weight.shape[0]
    w = weight.reshape(out, weight.shape[1] if weight.dim() > 1 else 1, -1)
    return w.reshape(groups, out // groups, w.shape[1], w.shape[2]), groups


def _output_ranges(module: nn.Module) -> Tensor:
    weight: Tensor = module.weight  # type: ignore[assignment]
    return weight.detach().double().abs().reshape(weight.shape[0], -1).amax(1)


def _input_ranges(module: nn.Module) -> Tensor:
    w, _ = _as_grouped(module)
    return w.detach().double().abs().amax(dim=(1, 3)).reshape(-1)  # [groups * in_pg]


def _range_ratio(module: nn.Module) -> float:
    """Largest over smallest per-output-channel weight range, ignoring dead channels (range
    below 1e-6 of the largest: their weights are zero for any quantizer)."""
    r = _output_ranges(module)
    r = r[r > 1e-6 * r.max()] if r.numel() else r
    return float(r.max() / r.min()) if r.numel() else math.nan


def _pair_scale(
    first: nn.Module, second: nn.Module, act: _Act, maxima: Tensor | None
) -> tuple[Tensor, int]:
    """Per-channel s (float64): first's output channel i is divided by s_i, second's input
    channel i multiplied by it. Returns s and the number of channels frozen at a clip."""
    r1 = _output_ranges(first)
    r2 = _input_ranges(second)
    ok = (r1 > 0) & (r2 > 0)
    scale = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, 1.0)), 1.0)
    scale = scale.clamp(1.0 / _MAX_SCALE, _MAX_SCALE)
    n_frozen = 0
    if act.kind == "clip":
        assert maxima is not None and act.clip is not None
        m = maxima.double()
        at_clip = m > act.clip
        n_frozen = int(at_clip.sum())
        scale = torch.where(at_clip, 1.0, torch.maximum(scale, m / act.clip))
    return scale, n_frozen


def _apply(first: nn.Module, second: nn.Module, scale: Tensor) -> None:
    w1: Tensor = first.weight  # type: ignore[assignment]
    shape1 = (-1, *([1] * (w1.dim() - 1)))
    w1.copy_((w1.double() / scale.reshape(shape1)).to(w1.dtype))
    b1 = first.bias
    if isinstance(b1, Tensor):
        b1.copy_((b1.double() / scale).to(b1.dtype))
    w2: Tensor = second.weight  # type: ignore[assignment]
    grouped, groups = _as_grouped(second)
    s = scale.reshape(groups, 1, -1, 1)
    w2.copy_((grouped.double() * s).reshape(w2.shape).to(w2.dtype))


def _channel_maxima(
    model: nn.Module,
    pairs: list[tuple[str, str, _Act]],
    calib_data: Iterable[Any],
    forward: Forward | None,
    progress: bool,
) -> dict[str, Tensor]:
    """Largest pre-activation value per output channel of each bounded pair's first layer."""
    if not pairs:
        return {}
    from lowbit.progress import progress_bar

    modules = dict(model.named_modules())
    maxima: dict[str, Tensor] = {}

    def make_hook(name: str) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(module: nn.Module, _args: Any, out: Tensor) -> None:
            axis = -1 if isinstance(module, nn.Linear) else 1
            m = out.detach().double().movedim(axis, 0).reshape(out.shape[axis], -1).amax(1)
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)

        return hook

    handles = [modules[first].register_forward_hook(make_hook(first)) for first, _, _ in pairs]
    try:
        for batch in progress_bar(calib_data, "equalize: activation ranges", enabled=progress):
            check_batch(batch)
            run_batch(model, batch, forward)
    finally:
        for h in handles:
            h.remove()
    return maxima


# ---------------------------------------------------------------------------------------------
# Tracing which layer feeds which


@dataclass
class _Node:
    """A value in the traced forward pass: a layer's output or an activation's output."""

    producer: str
    act: _Act | None = None
    # ("module", name, sole first input) | ("act", node index) | ("function", name)
    consumers: list[tuple[str, Any, bool]] = field(default_factory=list)


@dataclass
class _Graph:
    names: dict[int, str]
    nodes: list[_Node] = field(default_factory=list)
    node_of: dict[int, int] = field(default_factory=dict)
    keep: list[Tensor] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    depth: int = 0
    output: object = None

    def add(self, tensor: Tensor, node: _Node) -> int:
        self.nodes.append(node)
        self.node_of[id(tensor)] = len(self.nodes) - 1
        self.keep.append(tensor)  # keeps the id from being reused by a later tensor
        return len(self.nodes) - 1

    def use(self, obj: object, consumer: tuple[str, Any, bool]) -> None:
        for t in tensors_of(obj):
            if id(t) in self.node_of:
                self.nodes[self.node_of[id(t)]].consumers.append(consumer)


def _module_act(module: nn.Module) -> _Act | None:
    if isinstance(module, nn.ReLU | nn.LeakyReLU):
        return _Act("relu", None, type(module).__name__)
    if isinstance(module, nn.Hardtanh) and module.min_val == 0.0:
        return _Act("clip", float(module.max_val), type(module).__name__)
    return None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _function_act(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _Act | None:
    name = getattr(func, "__name__", "")
    if name in ("relu", "relu_", "leaky_relu", "leaky_relu_"):
        return _Act("relu", None, name)
    if name == "relu6":
        return _Act("clip", 6.0, name)
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
        return _Act("relu", None, name)
    if isinstance(hi, int | float) and hi > 0:
        return _Act("clip", float(hi), name)
    return None


def _opaque(module: nn.Module) -> bool:
    """Modules whose insides the trace does not look into (layers, activations, leaves)."""
    known = (*_EQ_LAYERS, *PRODUCER_TYPES, *_ACT_MODULES, *_PASS_THROUGH, *_BN_TYPES)
    return isinstance(module, known) or not any(True for _ in module.children())


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: _Graph) -> None:
        super().__init__()
        self.graph = graph

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        graph = self.graph
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: name it by its owner (x.T -> "T")
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        record = graph.depth == 0 and graph.node_of and not is_metadata(func)
        act = _function_act(func, args, kwargs) if record else None
        first = args[0] if args else None
        source = graph.node_of.get(id(first)) if isinstance(first, Tensor) else None
        if record and not (act is not None and source is not None):
            graph.use((args, kwargs), ("function", name, False))
        out = func(*args, **kwargs)
        if record and act is not None and source is not None and isinstance(out, Tensor):
            index = graph.add(out, _Node(producer=name, act=act))
            graph.nodes[source].consumers.append(("act", index, False))
            graph.use((args[1:], kwargs), ("function", name, False))
        return out


def _trace(model: nn.Module, run: Callable[[nn.Module], object]) -> _Graph:
    graph = _Graph(names={id(m): n for n, m in model.named_modules()})
    handles = []

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not _opaque(module):
            return
        if graph.depth == 0:
            name = graph.names.get(id(module), "?")
            graph.calls[name] = graph.calls.get(name, 0) + 1
            if not isinstance(module, _PASS_THROUGH) and _module_act(module) is None:
                tensors = list(tensors_of((args, kwargs)))
                sole = len(tensors) == 1 and bool(args) and tensors[0] is args[0]
                graph.use((args, kwargs), ("module", name, sole))
        graph.depth += 1

    def post_hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: object
    ) -> None:
        if not _opaque(module):
            return
        graph.depth -= 1
        if graph.depth != 0 or not isinstance(output, Tensor):
            return
        name = graph.names.get(id(module), "?")
        first = args[0] if args else None
        source = graph.node_of.get(id(first)) if isinstance(first, Tensor) else None
        act = _module_act(module)
        if isinstance(module, _PASS_THROUGH):
            if source is not None:
                graph.node_of[id(output)] = source
                graph.keep.append(output)
        elif act is not None:
            if source is None:
                return
            if len(list(tensors_of((args, kwargs)))) != 1:
                graph.use((args, kwargs), ("module", name, False))
                return
            index = graph.add(output, _Node(producer=name, act=act))
            graph.nodes[source].consumers.append(("act", index, False))
        elif isinstance(module, _EQ_LAYERS):
            graph.add(output, _Node(producer=name))

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    try:
        with torch.no_grad(), _Recorder(graph):
            graph.output = run(model)
    finally:
        for h in handles:
            h.remove()
    return graph


def _channels(module: nn.Module, side: Literal["in", "out"]) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features if side == "in" else module.out_features
    return int(module.in_channels if side == "in" else module.out_channels)  # type: ignore[arg-type]


def _same_family(a: nn.Module, b: nn.Module) -> bool:
    """Both Linear, or both convolutions of the same dimensionality (channels on axis 1)."""
    wa, wb = a.weight, b.weight
    assert isinstance(wa, Tensor) and isinstance(wb, Tensor)
    return isinstance(a, nn.Linear) == isinstance(b, nn.Linear) and wa.dim() == wb.dim()


def _find_pairs(
    model: nn.Module, graph: _Graph, relu6: Relu6Mode
) -> tuple[list[tuple[str, str, _Act]], list[tuple[str, str, str]]]:
    modules = dict(model.named_modules())
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    pairs: list[tuple[str, str, _Act]] = []
    skipped: list[tuple[str, str, str]] = []
    for node in graph.nodes:
        if node.act is not None or len(node.consumers) != 1:
            continue
        kind, target, sole = node.consumers[0]
        act = _Act("none")
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
        if not isinstance(m1, _EQ_LAYERS) or not isinstance(m2, _EQ_LAYERS) or m1 is m2:
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
