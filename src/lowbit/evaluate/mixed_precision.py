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

`diagnosis=` (a `lowbit.diagnose` result for the same model and config) replaces that ranking by
the diagnosis's own order, measured once and not again: its points, functional ops (residual
adds, attention matmuls) among them, most harmful first, the set it keeps in float leading. A
layer point is kept at the candidate precision; an op point has no weight, so it is kept in
float whatever the candidate. A `by="pattern"` diagnosis keeps each pattern (one point in every
block) as one unit.

The number of layers kept is found with `eval_fn`: 1, 2, 4, ... of the most sensitive layers
until the budget is met, then bisection between the last failure and the first success, so the
search takes about 2 log2(k) evaluations. Every evaluation is kept in the summary.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lowbit.batches import Forward
from lowbit.config import LayerQuant, QuantConfig
from lowbit.distributed import (
    DistributedError,
    active_group,
    example_batch,
    gather_objects,
    rank,
    step,
    sum_over_ranks,
)
from lowbit.evaluate.diagnosis import Diagnosis, escape
from lowbit.evaluate.sensitivity import (
    Sensitivity,
    SensitivityRun,
    Units,
    higher_modules,
    point_of,
    rank_layers,
    search_units,
)
from lowbit.exceptions import LowbitWarning
from lowbit.nn.modules import quant_modules
from lowbit.nn.records import describe
from lowbit.progress import progress_line
from lowbit.spec import PerChannel, QuantSpec
from lowbit.transforms.swap import LayerRecord
from lowbit.workflows.quantization import QuantSummary

__all__ = ["AutoQuantSummary", "AutoStep", "auto_quantize"]

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
    kept: tuple[tuple[str, str], ...]  # (layer or point, precision it kept)
    sensitivity: tuple[tuple[str, float], ...]  # most sensitive first (a diagnosis: `without`)
    steps: tuple[AutoStep, ...]
    quantized_layers: int  # the units ranked: layers, or the diagnosis's points

    @property
    def drop(self) -> float:
        """Accuracy points lost against the float model."""
        return self.float_accuracy - self.accuracy

    def __str__(self) -> str:
        verdict = "meets" if self.meets_budget else "does NOT meet"
        lines = [
            f"lowbit.auto_quantize: {self.accuracy:.2f}% vs float {self.float_accuracy:.2f}% "
            f"(drop {self.drop:.2f} pt, {verdict} the budget of {self.max_drop:g} pt); "
            f"{len(self.kept)} of {self.quantized_layers} layers (or points) kept in higher "
            "precision"
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
    eval_fn: Callable[[nn.Module], float | tuple[int, int]],
    max_drop: float = 1.0,
    *,
    candidates: Sequence[LayerQuant | None] | None = None,
    sensitivity: Sensitivity = "output",
    sensitivity_samples: int = 16,
    forward: Forward | None = None,
    progress: bool = True,
    group: Any = None,
    diagnosis: Diagnosis | None = None,
) -> nn.Module:
    """Quantize with `config`, keeping the fewest layers in higher precision that hold the
    accuracy drop (`eval_fn(float) - eval_fn(quantized)`, in points) within `max_drop`.

    eval_fn: model -> accuracy in percent (higher is better), e.g. top-1 on a held-out split;
        or -> (correct, total) sample counts, the accuracy being 100 * correct / total.
    candidates: the higher precisions to try, in order: a `LayerQuant` per kept layer, or None
        for float. Default: 8-bit per-channel weights with the config's activations, then float.
        Each candidate is tried with every layer kept before falling back to the next.
    sensitivity: how layers are ranked (see the module docstring); `sensitivity_samples` is
        the number of calibration samples the "output" and "local" rankings run on.
    diagnosis: `lowbit.diagnose(model, config, ...)`'s result: its order ranks the points
        (layers and functional ops) instead of a sensitivity pass; ValueError if its points are
        not those `config` quantizes in `model`.

    Returns the mixed-precision model; `model.lowbit_auto` says which layers were kept, the
    sensitivity ranking and the accuracy at every step. If no candidate meets the budget, the
    best model found is returned with a warning.

    Inside torch.distributed (or with `group=`), `calib_data` is this rank's shard (calibration
    as in `quantize`), and every measurement is summed over the ranks in rank order, so every
    rank picks the same layers: `eval_fn` returns this rank's (correct, total) counts, summed
    exactly (a percentage must then be the same on every rank), and the sensitivities add up
    each rank's output errors over its first `sensitivity_samples` samples.
    """
    _check_arguments(model, config, eval_fn, max_drop, sensitivity, sensitivity_samples)
    chosen = default_candidates(config) if candidates is None else tuple(candidates)
    _check_candidates(chosen)
    group = active_group(group)
    example_batch(calib_data, group)  # the usual error when no rank has a batch
    run = SensitivityRun(
        copy.deepcopy(model).eval(),
        config,
        calib_data,
        forward,
        chosen,
        sensitivity,
        sensitivity_samples,
        progress and rank(group) == 0,
        group,
    )
    log = _Evaluations(eval_fn, max_drop, run.progress, group)
    log.float_accuracy = log.accuracy(run.model)
    low = run.quantize(config)
    names = tuple(quant_modules(low))
    units = search_units(low, names, diagnosis)
    first = log.record((), "none", low)
    if first.meets_budget or not units.paths:
        return _finish(_Choice(first, low, {}), log, (), len(units.paths))
    return _search(run, low, names, units, log)


def _check_arguments(
    model: object,
    config: object,
    eval_fn: object,
    max_drop: object,
    sensitivity: object,
    sensitivity_samples: object,
) -> None:
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


def _counts(value: tuple[Any, ...]) -> tuple[int, int]:
    """(correct, total) from eval_fn, checked: two integers, 0 <= correct <= total."""
    ok = len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not 0 <= value[0] <= value[1]:
        raise ValueError(f"eval_fn's counts must be (correct, total) ints, got {value!r}")
    return value[0], value[1]


def _check_candidates(candidates: tuple[object, ...]) -> None:
    if not candidates:
        raise ValueError("candidates is empty: give at least one higher precision (or None)")
    for c in candidates:
        if c is not None and not isinstance(c, LayerQuant):
            raise TypeError(f"candidates must hold LayerQuant or None, got {type(c).__name__}")


@dataclass
class _Evaluations:
    """Calls `eval_fn`, checks what it returns, and keeps every step of the search in order."""

    eval_fn: Callable[[nn.Module], float | tuple[int, int]]
    max_drop: float
    progress: bool
    group: Any = None
    float_accuracy: float = math.nan
    steps: list[AutoStep] = field(default_factory=list)

    def accuracy(self, model: nn.Module) -> float:
        """`eval_fn(model)`, checked (a NaN or Inf would make every drop meaningless), as a
        percentage; counts summed over the ranks of the group."""
        with step(self.group, "auto_quantize's eval_fn"):
            value = self.eval_fn(model)
            if isinstance(value, tuple):
                counts = _counts(value)
            elif isinstance(value, int | float) and math.isfinite(value):
                percent = float(value)
            else:
                raise ValueError(
                    "eval_fn must return a finite accuracy in percent or (correct, total) "
                    f"counts, got {value!r}"
                )
        if isinstance(value, tuple):
            correct, total = sum_over_ranks(list(counts), self.group)
            if total <= 0:
                raise ValueError("eval_fn counted no samples (total 0 on every rank)")
            return 100.0 * correct / total
        seen = gather_objects(percent, self.group)
        if any(p != seen[0] for p in seen):
            raise DistributedError(
                f"eval_fn returned different accuracies on the ranks ({seen}): return "
                "(correct, total) counts so that they can be summed, or evaluate the same data "
                "on every rank"
            )
        return percent

    def drop(self, model: nn.Module) -> float:
        """Points lost by `model` against the float model."""
        return self.float_accuracy - self.accuracy(model)

    def record(self, kept: tuple[str, ...], candidate: str, model: nn.Module) -> AutoStep:
        """Evaluate `model`, in which the layers `kept` are at precision `candidate`."""
        accuracy = self.accuracy(model)
        drop = self.float_accuracy - accuracy
        step = AutoStep(kept, candidate, accuracy, drop, drop <= self.max_drop)
        self.steps.append(step)
        progress_line(
            f"auto_quantize: {len(kept)} kept ({candidate}): {accuracy:.2f}%",
            enabled=self.progress,
        )
        return step


@dataclass(frozen=True)
class _Choice:
    """A model the search may return, with the step that measured it."""

    step: AutoStep
    model: nn.Module
    kept: dict[str, str]  # unit -> the precision it kept
    points: dict[str, str] = field(default_factory=dict)  # layer or op point -> that precision


@dataclass(frozen=True)
class _Mix:
    """The low-precision model and, per submodule of a unit, its version at one higher precision:
    builds the model that keeps the `k` most sensitive units at that precision."""

    low: nn.Module
    high: dict[str, nn.Module]  # submodule path -> its higher-precision version
    units: Units
    order: tuple[str, ...]  # most sensitive first
    candidate: str

    def build(self, k: int) -> nn.Module:
        """A fresh model (copies only), so nothing an evaluation does to it reaches the next."""
        model = copy.deepcopy(self.low)
        for unit in self.order[:k]:
            for path in self.units.paths[unit]:
                model.set_submodule(path, copy.deepcopy(self.high[path]))
        return model

    def attempt(self, k: int, log: _Evaluations) -> AutoStep:
        """Evaluate the model that keeps the `k` most sensitive layers, and log the step."""
        return log.record(self.order[:k], self.candidate, self.build(k))

    def choice(self, step: AutoStep) -> _Choice:
        """The model measured by `step` (one of this mix's attempts), built afresh."""
        ops = self.units.ops
        kept = {u: "float" if u in ops else self.candidate for u in step.kept}
        points = {point_of(path): kept[u] for u in step.kept for path in self.units.paths[u]}
        return _Choice(step, self.build(len(step.kept)), kept, points)


def _search(
    run: SensitivityRun, low: nn.Module, names: tuple[str, ...], units: Units, log: _Evaluations
) -> nn.Module:
    """Try each candidate precision in turn; the first that meets the budget with some number
    of kept units wins. Otherwise the best model seen, with a warning."""
    ranking = units.ranking
    best = _Choice(log.steps[0], low, {})
    for candidate in run.candidates:
        high = run.quantize(_keep_all(run.config, names, candidate))
        ranking = ranking or rank_layers(run, low, high, names, log.drop)
        mix = _Mix(
            low,
            higher_modules(low, high, units),
            units,
            tuple(n for n, _ in ranking),
            describe_layer(candidate),
        )
        tried = len(log.steps)
        passing = _fewest_kept(mix, log)
        if passing is not None:
            return _finish(mix.choice(passing), log, ranking, len(units.paths))
        top = max(log.steps[tried:], key=lambda s: s.accuracy)
        if top.accuracy > best.step.accuracy:
            best = mix.choice(top)
    warnings.warn(
        f"auto_quantize: no candidate met the budget of {log.max_drop:g} pt; returning the best "
        f"model found ({best.step.accuracy:.2f}% vs float {log.float_accuracy:.2f}%)",
        LowbitWarning,
        stacklevel=3,  # the caller of auto_quantize
    )
    return _finish(best, log, ranking, len(units.paths))


def _keep_all(
    config: QuantConfig, names: tuple[str, ...], candidate: LayerQuant | None
) -> QuantConfig:
    """`config` with every layer in `names` at precision `candidate` (a new config)."""
    overrides = dict(config.overrides)
    overrides.update({escape(n): candidate for n in names})
    return dataclasses.replace(config, overrides=overrides)


def _fewest_kept(mix: _Mix, log: _Evaluations) -> AutoStep | None:
    """Keep 1, 2, 4, ... of the most sensitive layers, then all of them, until the budget is met;
    then bisect between the last failure and that success. The step with the fewest kept layers
    that meets the budget, or None when keeping every layer does not."""
    layers = len(mix.order)
    failing, k = 0, 1
    while not (step := mix.attempt(k, log)).meets_budget:
        if k == layers:
            return None
        failing, k = k, min(2 * k, layers)
    passing = step
    while len(passing.kept) - failing > 1:
        mid = (len(passing.kept) + failing) // 2
        step = mix.attempt(mid, log)
        if step.meets_budget:
            passing = step
        else:
            failing = mid
    return passing


def describe_layer(candidate: LayerQuant | None) -> str:
    """A candidate precision in a few words ("W int8 per-channel, I int8"), or "float"."""
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


def _finish(
    choice: _Choice,
    log: _Evaluations,
    ranking: tuple[tuple[str, float], ...],
    n_layers: int,
) -> nn.Module:
    """The chosen model, carrying the summary of the search as `lowbit_auto`."""
    summary = AutoQuantSummary(
        float_accuracy=log.float_accuracy,
        max_drop=log.max_drop,
        accuracy=choice.step.accuracy,
        meets_budget=choice.step.meets_budget,
        kept=tuple(choice.kept.items()),
        sensitivity=ranking,
        steps=tuple(log.steps),
        quantized_layers=n_layers,
    )
    choice.model.lowbit_auto = summary  # type: ignore[assignment]
    quantized = getattr(choice.model, "lowbit_summary", None)
    if isinstance(quantized, QuantSummary) and choice.points:
        choice.model.lowbit_summary = dataclasses.replace(  # type: ignore[assignment]
            quantized,
            layers=tuple(_kept_record(r, choice.points) for r in quantized.layers),
            ops=tuple(_kept_record(r, choice.points) for r in quantized.ops),
        )
    return choice.model


def _kept_record(record: LayerRecord, kept: dict[str, str]) -> LayerRecord:
    """A line of the quantize summary, saying so when auto_quantize kept it higher."""
    if record.name not in kept:
        return record
    precision = kept[record.name]
    return LayerRecord(
        record.name, record.kind, precision != "float", f"{precision} (kept by auto_quantize)"
    )
