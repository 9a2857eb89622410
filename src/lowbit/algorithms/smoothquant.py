"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, exactly.

A Linear layer computes x W^T. For any positive per-input-channel factors s,
x W^T = (x / s) (W * s)^T: dividing the input channels by s (folded into the op that produces
them, a LayerNorm's weight and bias or the rows of a preceding Linear) and multiplying the weight
columns by s leaves the float model's function unchanged, while

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

flattens the few huge activation channels (a few hundred times the others in transformers) at the
cost of slightly larger weight columns: both become easy to quantize to int8. Q, K and V reading
one LayerNorm share one s (their weights' column maxima taken together).

The producer of each Linear's input is found by running one calibration batch: an `nn.LayerNorm`
or `nn.Linear` whose output tensor is the very tensor the Linear receives. A fold is applied only
where a trial fold with random factors leaves the model's outputs unchanged, which rules out
producers whose output also goes elsewhere (a residual connection, as in post-LN BERT).
`explicit=True` smooths those Linears too, by an explicit factor in front of each
(`lowbit.nn.input_scale.InputScale`, a constant `Mul` in the export), as NNCF's transformer
preset does for OpenVINO: then every Linear's input is smoothed, whatever produced it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lowbit.algorithms._sequential import check_float_model
from lowbit.batches import Forward, check_batch, first_batch, run_batch, run_hooked, tensors_of
from lowbit.distributed import active_group, all_reduce, example_batch, step
from lowbit.nn.input_scale import InputScale
from lowbit.nn.modules import QuantModule
from lowbit.nn.quantizer import TensorQuantizer

__all__ = ["ScaleGroup", "fold_scale", "smooth_groups", "smoothquant"]

_TRIAL_RTOL = 1e-4


@dataclass
class ScaleGroup:
    """Linear layers that receive one tensor, and the LayerNorm / Linear that produced it."""

    producer_name: str | None
    producer: nn.Module | None
    consumer_names: list[str]
    consumers: list[nn.Module]


def smoothquant(
    model: nn.Module,
    calib_data: Iterable[Any],
    *,
    alpha: float = 0.5,
    explicit: bool = False,
    forward: Forward | None = None,
    group: Any = None,
) -> nn.Module:
    """Smooth every `nn.Linear` of a float `model` whose input comes straight from a LayerNorm
    or Linear that can absorb the factors, in place; returns `model`.

    Run it on the float model before `lowbit.quantize`. alpha: the migration strength in [0, 1]
    (0.5 for most models; larger moves more of the difficulty into the weights). Layers whose
    input producer cannot absorb the factors are left as they are; `model.lowbit_smoothquant`
    lists the groups smoothed, as (producer, [consumers]) names. explicit: smooth the others too,
    each behind an `InputScale` (producer "explicit"; the layer moves to `<name>.layer`). Inside
    torch.distributed (or
    with `group=`), `calib_data` is this rank's shard: the activation maxima are all-reduced
    (exact), so every rank smooths alike, as one process over all shards would.
    """
    check_float_model(model, "smoothquant")
    if not (isinstance(alpha, int | float) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    group = active_group(group)
    example = [example_batch(calib_data, group)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("smoothquant found no nn.Linear layer in the model")
    was_training = model.training
    model.eval()
    try:
        found = find_scale_groups(model, linears, example, forward)
        groups = [g for g in found if g.producer is not None]
        groups = [g for g in groups if foldable(model, g, example, forward)]
        rest = [g for g in found if explicit and not any(g is f for f in groups)]
        smooth_groups(model, groups, calib_data, alpha, forward=forward, group=group)
        scales = _group_scales(model, rest, calib_data, alpha, forward, group)
        for g, s in zip(rest, scales, strict=True):
            _scale_explicitly(model, g, s)
    finally:
        model.train(was_training)
    model.lowbit_smoothquant = tuple(  # type: ignore[assignment]
        [(g.producer_name, list(g.consumer_names)) for g in groups]
        + [("explicit", list(g.consumer_names)) for g in rest]
    )
    return model


def _scale_explicitly(model: nn.Module, group: ScaleGroup, s: Tensor) -> None:
    """Multiply the consumers' weight columns by `s` and put `x / s` in front of each."""
    with torch.no_grad():
        for name, c in zip(group.consumer_names, group.consumers, strict=True):
            w = _weight(c)
            w.mul_(s.to(w.dtype))
            model.set_submodule(name, InputScale(c, (1.0 / s).to(w.dtype)))


def smooth_groups(
    model: nn.Module,
    groups: Sequence[ScaleGroup],
    calib_data: Iterable[Any],
    alpha: float,
    *,
    forward: Forward | None = None,
    group: Any = None,
) -> None:
    """Smooth the given groups (whose producers are known to absorb the factors) with the
    activation maxima of `calib_data`: the step `smoothquant` takes once it found its groups,
    for callers that know their model's groups (`lowbit.pretrained`, block by block)."""
    scales = _group_scales(model, groups, calib_data, alpha, forward, group)
    for g, s in zip(groups, scales, strict=True):
        fold_scale(g, s)


def _group_scales(
    model: nn.Module,
    groups: Sequence[ScaleGroup],
    calib_data: Iterable[Any],
    alpha: float,
    forward: Forward | None,
    group: Any,
) -> list[Tensor]:
    """Each group's factors s = max|X|^alpha / max|W|^(1 - alpha) (1 where either is 0)."""
    if not groups:
        return []
    scales = []
    maxima = _input_abs_max(model, groups, calib_data, forward, group)
    for g, xmax in zip(groups, maxima, strict=True):
        wmax = torch.stack([_weight(c).detach().abs().amax(0) for c in g.consumers]).amax(0)
        xmax = xmax.to(wmax.dtype)
        s = xmax.pow(alpha) / wmax.pow(1.0 - alpha)
        ok = (xmax > 0) & (wmax > 0) & torch.isfinite(s)
        scales.append(torch.where(ok, s, torch.ones_like(s)).clamp(min=1e-5))
    return scales


def _weight(m: nn.Module) -> Tensor:
    """The float weight of a Linear or of the Linear inside a QuantModule."""
    inner = m.module if isinstance(m, QuantModule) else m
    w = inner.weight
    assert isinstance(w, Tensor)
    return w


def find_scale_groups(
    model: nn.Module,
    consumers: Sequence[tuple[str, nn.Module]],
    calib_data: Iterable[Any],
    forward: Forward | None = None,
    *,
    producer_types: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.Linear),
) -> list[ScaleGroup]:
    """Group `consumers` by the tensor they receive (first calibration batch), in execution order.

    A group's producer is the module of `producer_types` whose output is that tensor, or None.
    Consumers that never run are left out.
    """
    batch = first_batch(calib_data)
    check_batch(batch)
    produced: dict[int, tuple[str, nn.Module]] = {}
    received: list[tuple[str, nn.Module, Tensor]] = []
    keep: list[Tensor] = []  # keeps tensors alive so that their ids stay unique
    handles = []
    consumer_ids = {id(m) for _, m in consumers}
    seen: set[int] = set()

    def out_hook(name: str) -> Any:
        def hook(module: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                keep.append(out)
                produced.setdefault(id(out), (name, module))

        return hook

    def in_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor) and id(module) not in seen:
                seen.add(id(module))
                keep.append(args[0])
                received.append((name, module, args[0]))

        return hook

    for name, m in model.named_modules():
        if isinstance(m, producer_types) and id(m) not in consumer_ids:
            handles.append(m.register_forward_hook(out_hook(name)))
    # QuantModules wrap their Linear: a quantized Linear is not a producer here
    for name, m in consumers:
        handles.append(m.register_forward_pre_hook(in_hook(name)))
    run_hooked(model, batch, forward, handles, "calib_data batch 0")
    groups: list[ScaleGroup] = []
    by_tensor: dict[int, ScaleGroup] = {}
    for name, m, x in received:
        g = by_tensor.get(id(x))
        if g is None:
            pname, pmod = produced.get(id(x), (None, None))
            g = ScaleGroup(pname, pmod, [], [])
            by_tensor[id(x)] = g
            groups.append(g)
        g.consumer_names.append(name)
        g.consumers.append(m)
    return groups


def fold_scale(group: ScaleGroup, s: Tensor) -> None:
    """Divide the producer's output channels by `s`; multiply the consumers' weight columns."""
    p = group.producer
    with torch.no_grad():
        if isinstance(p, nn.LayerNorm) or _rms_norm(p):
            weight = getattr(p, "weight", None)
            if not isinstance(weight, Tensor):
                raise ValueError("a LayerNorm without elementwise affine cannot absorb scales")
            weight.div_(s.to(weight.dtype))
            bias = getattr(p, "bias", None)
            if bias is not None:
                bias.div_(s.to(bias.dtype))
        elif isinstance(p, nn.Linear):
            p.weight.div_(s.to(p.weight.dtype).unsqueeze(1))
            if p.bias is not None:
                p.bias.div_(s.to(p.bias.dtype))
        else:
            raise TypeError(f"cannot fold scales into {type(p).__name__}")
        for c in group.consumers:
            w = _weight(c)
            w.mul_(s.to(w.dtype))


def _rms_norm(p: nn.Module | None) -> bool:
    """An RMSNorm whose output is `weight * x / rms(x)`: torch's, or a transformers model's own
    class of that name (Llama, Mistral, Qwen2; not Gemma's `1 + weight`)."""
    if isinstance(p, nn.RMSNorm):
        return True
    name = type(p).__name__
    return name.endswith("RMSNorm") and not name.startswith("Gemma") and hasattr(p, "weight")


def _can_absorb(p: nn.Module | None) -> bool:
    if isinstance(p, nn.LayerNorm):
        return p.weight is not None
    return isinstance(p, nn.Linear)


def foldable(
    model: nn.Module,
    group: ScaleGroup,
    calib_data: Iterable[Any],
    forward: Forward | None = None,
) -> bool:
    """Whether folding factors into `group.producer` leaves the model's outputs unchanged.

    Tries random factors in [0.5, 2] on the first batch with every quantizer switched off,
    compares every output tensor, and restores the weights.
    """
    if not _can_absorb(group.producer):
        return False
    assert group.producer is not None
    batch = first_batch(calib_data)
    quantizers = [q for q in model.modules() if isinstance(q, TensorQuantizer)]
    modes = [q.mode for q in quantizers]
    saved_producer = copy.deepcopy(group.producer.state_dict())
    saved = [_weight(c).detach().clone() for c in group.consumers]
    n = _weight(group.consumers[0]).shape[1]
    gen = torch.Generator().manual_seed(0)
    s = torch.exp2(torch.rand(n, generator=gen) * 2 - 1).to(_weight(group.consumers[0]).device)
    try:
        for q in quantizers:
            q.set_mode("off")
        with torch.no_grad():
            before = [t.detach().clone() for t in tensors_of(run_batch(model, batch, forward))]
            fold_scale(group, s)
            after = [t.detach() for t in tensors_of(run_batch(model, batch, forward))]
        same = len(before) == len(after) and all(
            a.shape == b.shape
            and (
                not a.is_floating_point()
                or bool(
                    ((a - b).abs() <= _TRIAL_RTOL * (b.abs().amax() + 1e-12)).all()
                    and math.isfinite(float(a.abs().sum()))
                )
            )
            for a, b in zip(after, before, strict=False)
        )
    finally:
        group.producer.load_state_dict(saved_producer)
        with torch.no_grad():
            for c, w in zip(group.consumers, saved, strict=True):
                _weight(c).copy_(w)
        for q, mode in zip(quantizers, modes, strict=True):
            q.mode = mode
    return same


def _input_abs_max(
    model: nn.Module,
    groups: Sequence[ScaleGroup],
    calib_data: Iterable[Any],
    forward: Forward | None,
    group: Any,
) -> list[Tensor]:
    """Per-channel max |x| of each group's input over all calibration batches (of every rank
    of `group`: a rank without batches contributes zeros)."""
    maxima: list[Tensor | None] = [None] * len(groups)
    handles = []

    def make(i: int) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            cur = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
            prev = maxima[i]
            maxima[i] = cur if prev is None else torch.maximum(prev, cur)

        return hook

    for i, g in enumerate(groups):
        handles.append(g.consumers[0].register_forward_pre_hook(make(i)))
    try:
        with torch.no_grad(), step(group, "smoothquant's activation pass"):
            for batch in calib_data:
                check_batch(batch)
                run_batch(model, batch, forward)
    finally:
        for h in handles:
            h.remove()
    if group is not None:
        for i, g in enumerate(groups):
            m = maxima[i]
            m = torch.zeros(_weight(g.consumers[0]).shape[1]) if m is None else m
            maxima[i] = all_reduce(m, group, dist.ReduceOp.MAX)
    out = []
    for g, m in zip(groups, maxima, strict=True):
        if m is None:
            raise ValueError(f"layer {g.consumer_names[0]!r} saw no calibration data")
        out.append(m)
    return out
