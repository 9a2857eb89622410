"""Accuracy-aware mixed precision: find the few layers that must stay in higher precision.

`auto_quantize` quantizes every layer with the given config, and if the accuracy drop exceeds
the budget it ranks the layers by sensitivity and keeps the most sensitive ones in higher
precision (a candidate `LayerQuant`, or float), as few as meet the budget.

Sensitivity of a layer: how far the model's outputs move from the float model's when only that
layer is at the low precision and every other layer at the candidate (higher) precision. Measured
this way round, it stays informative when the fully quantized model is broken (a model at 11%
top-1 hardly changes when one layer is restored, but one fragile layer quantized alone shows up
clearly). `sensitivity="output"` (default) measures the mean squared output error on a few
calibration samples; `"eval"` calls `eval_fn` once per layer (slower, exact);
`"local"` is a one-pass proxy, each layer's own output SQNR.

The number of layers kept is found with `eval_fn`: 1, 2, 4, ... of the most sensitive layers
until the budget is met, then bisection between the last failure and the first success, so the
search takes about 2 log2(k) evaluations. Every evaluation is kept in the summary.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lowbit.batches import Forward, first_batch, run_batch
from lowbit.config import LayerQuant, QuantConfig
from lowbit.exceptions import LowbitWarning
from lowbit.nn.modules import QuantModule
from lowbit.progress import progress_bar, progress_line
from lowbit.spec import PerChannel, QuantSpec
from lowbit.transforms.fold_bn import flatten_outputs
from lowbit.transforms.swap import describe
from lowbit.workflows.quantization import quantize

__all__ = ["AutoQuantSummary", "AutoStep", "auto_quantize"]

Sensitivity = Literal["output", "eval", "local"]
_SENSITIVITIES = ("output", "eval", "local")


@dataclass(frozen=True)
class AutoStep:
    """One evaluation of the search: the layers kept in higher precision and the accuracy."""

    kept: tuple[str, ...]
    candidate: str
    accuracy: float
    drop: float
    meets_budget: bool


@dataclass(frozen=True)
class AutoQuantSummary:
    """What `auto_quantize` chose; kept on the returned model as `lowbit_auto`."""

    float_accuracy: float
    max_drop: float
    accuracy: float
    meets_budget: bool
    kept: tuple[tuple[str, str], ...]  # (layer, precision it kept)
    sensitivity: tuple[tuple[str, float], ...]  # most sensitive first
    steps: tuple[AutoStep, ...]
    quantized_layers: int

    @property
    def drop(self) -> float:
        return self.float_accuracy - self.accuracy

    def __str__(self) -> str:
        verdict = "meets" if self.meets_budget else "does NOT meet"
        lines = [
            f"lowbit.auto_quantize: {self.accuracy:.2f}% vs float {self.float_accuracy:.2f}% "
            f"(drop {self.drop:.2f} pt, {verdict} the budget of {self.max_drop:g} pt); "
            f"{len(self.kept)} of {self.quantized_layers} layers kept in higher precision"
        ]
        for name, what in self.kept:
            lines.append(f"  kept {name}: {what}")
        lines.append("  search:")
        for s in self.steps:
            mark = "ok" if s.meets_budget else "--"
            lines.append(
                f"    {mark} {len(s.kept):3d} kept ({s.candidate}): {s.accuracy:.2f}% "
                f"(drop {s.drop:.2f})"
            )
        return "\n".join(lines)


def default_candidates(config: QuantConfig) -> tuple[LayerQuant | None, ...]:
    """8-bit per-channel weights with the config's activation specs, then float."""
    weight = None
    if config.weight is not None:
        weight = QuantSpec(bits=8, narrow_range=True, granularity=PerChannel(0))
    return (LayerQuant(weight, config.input, config.output), None)


def auto_quantize(
    model: nn.Module,
    config: QuantConfig,
    calib_data: Iterable[Any],
    eval_fn: Callable[[nn.Module], float],
    max_drop: float = 1.0,
    *,
    candidates: Sequence[LayerQuant | None] | None = None,
    sensitivity: Sensitivity = "output",
    sensitivity_samples: int = 16,
    forward: Forward | None = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize with `config`, keeping the fewest layers in higher precision that hold the
    accuracy drop (`eval_fn(float) - eval_fn(quantized)`, in points) within `max_drop`.

    eval_fn: model -> accuracy in percent (higher is better), e.g. top-1 on a held-out split.
    candidates: the higher precisions to try, in order: a `LayerQuant` per kept layer, or None
        for float. Default: 8-bit per-channel weights with the config's activations, then float.
        Each candidate is tried with every layer kept before falling back to the next.
    sensitivity: how layers are ranked (see the module docstring); `sensitivity_samples` is
        the number of calibration samples the "output" and "local" rankings run on.

    Returns the mixed-precision model; `model.lowbit_auto` says which layers were kept, the
    sensitivity ranking and the accuracy at every step. If no candidate meets the budget, the
    best model found is returned with a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a QuantConfig (see lowbit.presets), got {type(config).__name__}"
        )
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable (model -> accuracy %), got {eval_fn!r}")
    if not isinstance(max_drop, int | float) or not max_drop >= 0 or math.isinf(max_drop):
        raise ValueError(f"max_drop must be a finite number >= 0 (points), got {max_drop!r}")
    if sensitivity not in _SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {_SENSITIVITIES}, got {sensitivity!r}")
    if not isinstance(sensitivity_samples, int) or sensitivity_samples < 1:
        raise ValueError(f"sensitivity_samples must be a positive int, got {sensitivity_samples!r}")
    candidates = default_candidates(config) if candidates is None else tuple(candidates)
    if not candidates:
        raise ValueError("candidates is empty: give at least one higher precision (or None)")
    for c in candidates:
        if c is not None and not isinstance(c, LayerQuant):
            raise TypeError(f"candidates must hold LayerQuant or None, got {type(c).__name__}")
    first_batch(calib_data)
    model = copy.deepcopy(model).eval()

    def evaluate(m: nn.Module) -> float:
        value = eval_fn(m)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"eval_fn must return a finite accuracy in percent, got {value!r}")
        return float(value)

    float_acc = evaluate(model)
    low = quantize(model, config, calib_data, forward=forward, progress=False)
    names = [n for n, m in low.named_modules() if isinstance(m, QuantModule)]
    steps: list[AutoStep] = []

    def record(kept: tuple[str, ...], what: str, acc: float) -> AutoStep:
        step = AutoStep(kept, what, acc, float_acc - acc, float_acc - acc <= max_drop)
        steps.append(step)
        progress_line(f"auto_quantize: {len(kept)} kept ({what}): {acc:.2f}%", enabled=progress)
        return step

    if record((), "none", evaluate(low)).meets_budget or not names:
        return _finish(low, {}, float_acc, max_drop, steps, (), len(names))

    ranking: tuple[tuple[str, float], ...] = ()
    best: tuple[float, nn.Module, dict[str, str]] = (steps[0].accuracy, low, {})
    for candidate in candidates:
        what = describe_layer(candidate)
        override = copy.copy(config)
        override.overrides = {**config.overrides, **{_escape(n): candidate for n in names}}
        high = quantize(model, override, calib_data, forward=forward, progress=False)
        high_modules = {n: high.get_submodule(n) for n in names}
        if not ranking:
            ranking = _rank(
                model,
                low,
                high,
                names,
                sensitivity,
                calib_data,
                sensitivity_samples,
                evaluate,
                float_acc,
                forward,
                progress,
            )
        order = [n for n, _ in ranking]

        def mixed(
            k: int, order: list[str] = order, modules: dict[str, nn.Module] = high_modules
        ) -> nn.Module:
            m = copy.deepcopy(low)
            for n in order[:k]:
                _set_submodule(m, n, copy.deepcopy(modules[n]))
            return m

        def attempt(k: int, what: str = what, order: list[str] = order) -> AutoStep:
            return record(tuple(order[:k]), what, evaluate(mixed(k)))

        passing: int | None = None
        failing = 0
        k = 1
        while k < len(order):
            step = attempt(k)
            if step.accuracy > best[0]:
                best = (step.accuracy, mixed(k), dict.fromkeys(order[:k], what))
            if step.meets_budget:
                passing = k
                break
            failing = k
            k *= 2
        if passing is None:
            step = attempt(len(order))
            if step.accuracy > best[0]:
                best = (step.accuracy, mixed(len(order)), dict.fromkeys(order, what))
            if not step.meets_budget:
                continue
            passing = len(order)
        while passing - failing > 1:
            mid = (passing + failing) // 2
            if attempt(mid).meets_budget:
                passing = mid
            else:
                failing = mid
        result = mixed(passing)
        return _finish(
            result,
            dict.fromkeys(order[:passing], what),
            float_acc,
            max_drop,
            steps,
            ranking,
            len(names),
        )
    warnings.warn(
        f"auto_quantize: no candidate met the budget of {max_drop:g} pt; returning the best "
        f"model found ({best[0]:.2f}% vs float {float_acc:.2f}%)",
        LowbitWarning,
        stacklevel=2,
    )
    return _finish(best[1], best[2], float_acc, max_drop, steps, ranking, len(names))


def describe_layer(candidate: LayerQuant | None) -> str:
    if candidate is None:
        return "float"
    parts = [
        f"{role[0].upper()} {describe(spec)}"
        for role, spec in (
            ("weight", candidate.weight),
            ("input", candidate.input),
            ("output", candidate.output),
        )
        if spec is not None
    ]
    return ", ".join(parts) or "float"


def _escape(name: str) -> str:
    """A glob matching exactly `name` (module names rarely hold glob characters)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def _finish(
    model: nn.Module,
    kept: dict[str, str],
    float_acc: float,
    max_drop: float,
    steps: list[AutoStep],
    ranking: tuple[tuple[str, float], ...],
    n_layers: int,
) -> nn.Module:
    final = next(
        (s for s in reversed(steps) if set(s.kept) == set(kept)),
        steps[0],
    )
    summary = AutoQuantSummary(
        float_accuracy=float_acc,
        max_drop=max_drop,
        accuracy=final.accuracy,
        meets_budget=final.meets_budget,
        kept=tuple(kept.items()),
        sensitivity=ranking,
        steps=tuple(steps),
        quantized_layers=n_layers,
    )
    model.lowbit_auto = summary  # type: ignore[assignment]
    return model


# ---------------------------------------------------------------------------------------------
# Sensitivity


def _samples(calib_data: Iterable[Any], n: int) -> list[Any]:
    out, count = [], 0
    for batch in calib_data:
        out.append(batch)
        first = next((t for t in _tensors(batch) if t.dim() > 0), None)
        count += 1 if first is None else int(first.shape[0])
        if count >= n:
            break
    return out


def _tensors(batch: Any) -> list[Tensor]:
    from lowbit.batches import tensors_of

    return list(tensors_of(batch))


def _outputs(model: nn.Module, batches: list[Any], forward: Forward | None) -> list[Tensor]:
    with torch.no_grad():
        return [
            torch.cat(
                [
                    t.detach().double().flatten()
                    for t in flatten_outputs(run_batch(model, b, forward))
                ]
            )
            for b in batches
        ]


def _rank(
    float_model: nn.Module,
    low: nn.Module,
    high: nn.Module,
    names: list[str],
    sensitivity: Sensitivity,
    calib_data: Iterable[Any],
    n_samples: int,
    evaluate: Callable[[nn.Module], float],
    float_acc: float,
    forward: Forward | None,
    progress: bool,
) -> tuple[tuple[str, float], ...]:
    """Layers with their sensitivity, most sensitive first."""
    scores: dict[str, float] = {}
    batches = _samples(calib_data, n_samples)
    if sensitivity == "local":
        scores = _local_noise(low, names, batches, forward)
    else:
        reference = _outputs(float_model, batches, forward) if sensitivity == "output" else []
        for name in progress_bar(names, "auto_quantize: sensitivity", enabled=progress):
            kept = high.get_submodule(name)
            _set_submodule(high, name, low.get_submodule(name))
            try:
                if sensitivity == "eval":
                    scores[name] = float_acc - evaluate(high)
                else:
                    out = _outputs(high, batches, forward)
                    scores[name] = float(
                        sum(((a - b) ** 2).mean() for a, b in zip(out, reference, strict=True))
                    ) / len(out)
            finally:
                _set_submodule(high, name, kept)
    return tuple(sorted(scores.items(), key=lambda kv: -kv[1]))


def _local_noise(
    low: nn.Module, names: list[str], batches: list[Any], forward: Forward | None
) -> dict[str, float]:
    """Noise-to-signal ratio of each layer's output against its float layer on the same input."""
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)

    def make_hook(name: str):
        def hook(qm: QuantModule, args: tuple[Any, ...], out: Any) -> None:
            if not isinstance(out, Tensor):
                return
            ref = qm.module(*args)
            signal[name] += float(ref.double().pow(2).sum())
            noise[name] += float((ref.double() - out.double()).pow(2).sum())

        return hook

    handles = [low.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                run_batch(low, b, forward)
    finally:
        for h in handles:
            h.remove()
    return {n: noise[n] / max(signal[n], 1e-30) for n in names}
