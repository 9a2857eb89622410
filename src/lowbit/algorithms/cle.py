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

The pairs are found by tracing one forward pass (`lowbit.algorithms._cle_pairs`), since real
models wire their layers in custom forward code rather than in an nn.Sequential.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lowbit.algorithms._cle_pairs import Act, Relu6Mode, find_pairs
from lowbit.algorithms._sequential import check_float_model, summary_text
from lowbit.batches import (
    Forward,
    check_batch,
    outputs_match,
    run_batch,
    run_user_batch,
)
from lowbit.config import QuantConfig, weight_spec_for
from lowbit.distributed import active_group, all_reduce, example_batch, step
from lowbit.spec import PerChannel, PerGroup
from lowbit.transforms.fold_bn import flatten_outputs, fold_batchnorm
from lowbit.transforms.trace import trace

__all__ = ["EqualizationReport", "EqualizedPair", "equalize"]

_RELU6_MODES = ("bounded", "skip")
# Largest rescaling allowed per step: keeps a dead channel (range ~0) from producing Inf.
_MAX_SCALE = 1e6


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
        head = (
            f"lowbit: equalized {len(self.pairs)} layer pair(s) in {self.iterations} "
            f"iteration(s); folded {len(self.folded_batchnorms)} BatchNorm(s)"
        )
        rows = [
            f"{p.first} -> {p.activation} -> {p.second}: weight range ratio of the first "
            f"{p.range_ratio_before:.1f} -> {p.range_ratio_after:.1f}"
            + (f", {p.frozen_channels} channel(s) at the clip kept" if p.frozen_channels else "")
            for p in self.pairs
        ]
        return summary_text(head, rows, [(f"{a} -> {b}", why) for a, b, why in self.skipped])


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
    group: Any = None,
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
    module docstring; inside torch.distributed, or with `group=`, all-reduced over the ranks).
    `iterations` bounds the rounds over all pairs; rounds stop early once no scale changes by
    more than `tolerance` (relative). The result's outputs equal the input
    model's to float rounding on the first batch (checked; on a mismatch the model is left
    unchanged and RuntimeError is raised). `model.lowbit_equalization` says which pairs were
    equalized and how much the weight ranges evened out.
    """
    check_float_model(model, "equalize")
    _check_settings(iterations, relu6, tolerance, config)
    group = active_group(group)
    example = example_batch(calib_data, group)
    check_batch(example)
    if model.training:
        raise ValueError("model: is in training mode; call model.eval() first")
    if not inplace:
        model = copy.deepcopy(model)

    def run(m: nn.Module) -> object:
        return run_user_batch(m, example, forward, "calib_data batch 0")

    with torch.no_grad():
        folded = fold_batchnorm(model, run)
        seen = trace(model, run)
        before = [t.detach().clone() for t in flatten_outputs(seen.output)]
        pairs, skipped = find_pairs(model, seen, relu6)
        del seen
        modules = dict(model.named_modules())
        if config is not None:
            why = {first: _cannot_help(first, modules[first], config) for first, _, _ in pairs}
            skipped += [(first, second, why[first]) for first, second, _ in pairs if why[first]]
            pairs = [p for p in pairs if not why[p[0]]]
        clipped = [p for p in pairs if p[2].kind == "clip"]
        maxima = _channel_maxima(model, clipped, calib_data, forward, progress, group)
        saved = {n: _clone(modules[n]) for pair in pairs for n in pair[:2]}
        ratios = {first: _range_ratio(modules[first]) for first, _, _ in pairs}
        rounds, frozen = _rescale(modules, pairs, maxima, iterations, tolerance)
        if not outputs_match(before, [t.detach() for t in flatten_outputs(run(model))]):
            _restore(modules, saved)
            raise RuntimeError(
                "equalize: outputs changed after equalization, so the weights were restored; "
                "a layer's output is probably read in a way the trace could not see. Pairs: "
                f"{[(a, b) for a, b, _ in pairs]}"
            )
    model.lowbit_equalization = EqualizationReport(  # type: ignore[assignment]
        tuple(_pair_record(modules, p, frozen, ratios) for p in pairs),
        tuple(skipped),
        rounds,
        tuple(folded),
    )
    return model


def _pair_record(
    modules: dict[str, nn.Module],
    pair: tuple[str, str, Act],
    frozen: dict[str, int],
    ratios_before: dict[str, float],
) -> EqualizedPair:
    first, second, act = pair
    after = _range_ratio(modules[first])
    name = act.name or act.kind
    return EqualizedPair(first, second, name, frozen.get(first, 0), ratios_before[first], after)


def _check_settings(
    iterations: int, relu6: Relu6Mode, tolerance: float, config: QuantConfig | None
) -> None:
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if relu6 not in _RELU6_MODES:
        raise ValueError(f"relu6 must be one of {_RELU6_MODES}, got {relu6!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance!r}")
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config: expected a QuantConfig or None, got {type(config).__name__}")


def _rescale(
    modules: dict[str, nn.Module],
    pairs: list[tuple[str, str, Act]],
    maxima: dict[str, Tensor],
    iterations: int,
    tolerance: float,
) -> tuple[int, dict[str, int]]:
    """Equalize every pair in turns until no scale moves by `tolerance` (relative) or
    `iterations` rounds; returns the rounds run and the channels frozen at a clip per pair."""
    frozen: dict[str, int] = {}
    rounds = 0
    for rounds in range(1, iterations + 1):  # noqa: B007 - returned
        change = 0.0
        for first, second, act in pairs:
            m = maxima.get(first)
            scale, frozen[first] = _pair_scale(modules[first], modules[second], act, m)
            _apply(modules[first], modules[second], scale)
            if m is not None:
                maxima[first] = m / scale
            change = max(change, float((scale.log().abs()).max()) if scale.numel() else 0.0)
        if change < tolerance:
            break
    return rounds, frozen


def _clone(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    bias = module.bias
    weight: Tensor = module.weight  # type: ignore[assignment]
    return weight.detach().clone(), bias.detach().clone() if isinstance(bias, Tensor) else None


def _restore(modules: dict[str, nn.Module], saved: dict[str, tuple[Tensor, Tensor | None]]) -> None:
    for name, (weight, bias) in saved.items():
        modules[name].weight.copy_(weight)  # type: ignore[operator]
        if bias is not None:
            modules[name].bias.copy_(bias)  # type: ignore[operator]


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
    first: nn.Module, second: nn.Module, act: Act, maxima: Tensor | None
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
    pairs: list[tuple[str, str, Act]],
    calib_data: Iterable[Any],
    forward: Forward | None,
    progress: bool,
    group: Any,
) -> dict[str, Tensor]:
    """Largest pre-activation value per output channel of each bounded pair's first layer
    (over every rank of `group`: an exact all-reduce of the maxima)."""
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
        with step(group, "equalize's activation pass"):
            for batch in progress_bar(calib_data, "equalize: activation ranges", enabled=progress):
                check_batch(batch)
                run_batch(model, batch, forward)
    finally:
        for h in handles:
            h.remove()
    if group is not None:
        for first, _, _ in pairs:
            layer = modules[first]
            channels = int(getattr(layer, "out_channels", getattr(layer, "out_features", 0)))
            mine = maxima.get(first, torch.full((channels,), -math.inf, dtype=torch.float64))
            reduced = all_reduce(mine, group, dist.ReduceOp.MAX)
            if bool(torch.isfinite(reduced).any()):  # a layer no rank ran stays without
                maxima[first] = reduced
    return maxima
