"""Diagnosis: which quantizer points (layers and functional ops) lose the accuracy, and the
fewest to keep in float that win most of it back.

`diagnose` quantizes once with the config, then only switches quantizers on and off (no second
calibration): weights only, activations only, and for every point (a quantized layer, or a
functional-op point such as `encoder.layer.0.attention.self.add_0`) the measure with only that
point quantized ("alone") and with every point but that one ("without"). The sweep measure is
the model's output SQNR against the float model on the first `sweep_samples` evaluation samples
(one cheap pass per value), or the user's metric (`sweep="metric"`: 2 evaluations per point).

The set kept in float is grown greedily: at each step the point whose float version raises the
sweep measure the most, given those already kept, joins it (ties between copies of one culprit,
as the attention-mask add of every block, are then all visible in the ranking); then `metric`
(or the output SQNR on all of `eval_data`) measures the model that keeps the first 1, 2, ...
of them, until `recover` of the loss is won back or `keep` points are kept.

The loss recovered is `(m_kept - m_quantized) / (m_float - m_quantized)` for a metric, and the
share of output noise energy removed for the SQNR (its float value is infinite).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from lowbit.batches import Forward, first_batch, flat_outputs, head_batches
from lowbit.config import QuantConfig
from lowbit.evaluate.sqnr import output_sqnr
from lowbit.nn.modules import quant_modules
from lowbit.nn.op_points import ATTRIBUTE, op_points
from lowbit.nn.quantizer import TensorQuantizer, switched_off
from lowbit.progress import progress_bar
from lowbit.workflows.quantization import quantize

__all__ = ["Diagnosis", "PointDiagnosis", "diagnose", "quantizer_points"]

Metric = Callable[[nn.Module], float]
Sweep = Literal["sqnr", "metric"]
By = Literal["point", "pattern"]


@dataclass(frozen=True)
class QuantizerPoint:
    """A place that quantizes: a layer (its weight, input, output quantizers) or an op point."""

    name: str
    kind: str  # the layer's class ("Linear") or the op ("add")
    is_op: bool
    quantizers: tuple[TensorQuantizer, ...]
    weights: tuple[TensorQuantizer, ...] = ()  # those that quantize a weight
    paths: tuple[str, ...] = ()  # the submodules that hold it (a layer, an op's quantizer)


def quantizer_points(qmodel: nn.Module) -> list[QuantizerPoint]:
    """Every layer and functional-op point of a quantized model, layers first."""
    points = []
    for name, layer in quant_modules(qmodel).items():
        weight = layer.weight_quantizer
        points.append(
            QuantizerPoint(
                name,
                type(layer.module).__name__,
                False,
                tuple(layer.quantizers().values()),
                () if weight is None else (weight,),
                (name,),
            )
        )
    for caller, ops in op_points(qmodel).items():
        holder = f"{caller}.{ATTRIBUTE}" if caller else ATTRIBUTE
        for local, q in ops.quantizers().items():
            path = f"{holder}.{local}"
            kind = local.rpartition("_")[0]
            points.append(QuantizerPoint(ops.point(local), kind, True, (q,), (), (path,)))
    return points


def by_pattern(points: Sequence[QuantizerPoint]) -> list[QuantizerPoint]:
    """The points merged by name pattern, each number between dots a `*`: the twelve blocks'
    `encoder.layer.3.output.add_0` become one `encoder.layer.*.output.add_0`, a unit that can
    be kept in float by one override (transformers repeat their culprits in every block)."""
    groups: dict[str, list[QuantizerPoint]] = {}
    for p in points:
        groups.setdefault(re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", p.name), []).append(p)
    return [
        QuantizerPoint(
            pattern,
            members[0].kind,
            members[0].is_op,
            tuple(q for m in members for q in m.quantizers),
            tuple(q for m in members for q in m.weights),
            tuple(path for m in members for path in m.paths),
        )
        for pattern, members in groups.items()
    ]


def by_role(
    points: Sequence[QuantizerPoint],
) -> tuple[list[TensorQuantizer], list[TensorQuantizer]]:
    """The quantizers of `points` that quantize weights, and those that quantize activations."""
    weights = [q for p in points for q in p.weights]
    ids = {id(q) for q in weights}
    return weights, [q for p in points for q in p.quantizers if id(q) not in ids]


@contextmanager
def only(points: Sequence[QuantizerPoint], keep: Iterable[TensorQuantizer]) -> Iterator[None]:
    """Every quantizer of `points` off meanwhile but those in `keep` (their modes come back)."""
    kept = {id(q) for q in keep}
    with switched_off(q for p in points for q in p.quantizers if id(q) not in kept):
        yield


@dataclass(frozen=True)
class PointDiagnosis:
    """One point's sweep: the measure with only it quantized and with all but it quantized."""

    name: str
    kind: str
    is_op: bool
    alone: float
    without: float


@dataclass(frozen=True)
class Diagnosis:
    """What `diagnose` measured; `str()` is a table, `keep_float_config` applies the finding.

    measure / sweep_measure: what the summary values and the per-point values are.
    points: most harmful first (the greedy order, then by the gain of keeping it in float).
    steps: (points kept in float, measure) for 1, 2, ... of `keep_float`.
    """

    measure: str
    sweep_measure: str
    by: By
    float_value: float
    quantized: float
    weights_only: float
    activations_only: float
    points: tuple[PointDiagnosis, ...]
    keep_float: tuple[str, ...]
    steps: tuple[tuple[tuple[str, ...], float], ...]
    seconds: float

    def recovered(self, value: float) -> float:
        """The share of the loss (float -> quantized) that a model measuring `value` wins back."""
        return recovered_share(self.measure_is_sqnr, self.float_value, self.quantized, value)

    @property
    def measure_is_sqnr(self) -> bool:
        return self.measure.startswith("output SQNR")

    def keep_float_config(self, config: QuantConfig, count: int | None = None) -> QuantConfig:
        """`config` with the first `count` (default: all) of `keep_float` kept in float."""
        names = self.keep_float[:count]
        ops = {p.name for p in self.points if p.is_op}
        glob = (lambda n: n) if self.by == "pattern" else escape
        layers = {glob(n): None for n in names if n not in ops}
        op_keys = {glob(n): None for n in names if n in ops}
        return dataclasses.replace(
            config,
            overrides={**config.overrides, **layers},
            op_overrides={**config.op_overrides, **op_keys},
        )

    def __str__(self) -> str:
        return "\n".join(_table(self))


def recovered_share(sqnr: bool, float_value: float, quantized: float, value: float) -> float:
    """(value - quantized) / (float - quantized); for an SQNR in dB (float: inf), the share of
    output noise energy removed: 1 - 10^((quantized - value) / 10)."""
    if sqnr:
        return 1.0 - 10.0 ** ((quantized - value) / 10.0)
    lost = float_value - quantized
    return 1.0 if lost == 0 else (value - quantized) / lost


def escape(name: str) -> str:
    """A glob matching exactly `name` (module names rarely hold glob characters)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _table(d: Diagnosis) -> list[str]:
    lines = [
        f"lowbit.diagnose ({d.measure}; per point: {d.sweep_measure}; {d.seconds:.0f} s)",
        f"  float {d.float_value:.2f}   quantized {d.quantized:.2f}   weights only "
        f"{d.weights_only:.2f}   activations only {d.activations_only:.2f}",
    ]
    for kept, value in d.steps:
        lines.append(
            f"  keep {len(kept)} in float ({kept[-1]}): {value:.2f}, "
            f"{100 * d.recovered(value):.0f}% of the loss recovered"
        )
    width = max((len(p.name) for p in d.points), default=4)
    lines.append(f"  {'point':<{width}}  {'kind':<10} {'alone':>8} {'without':>8}")
    for p in d.points:
        lines.append(f"  {p.name:<{width}}  {p.kind:<10} {p.alone:8.2f} {p.without:8.2f}")
    return lines


# ---------------------------------------------------------------------------------------------


@dataclass
class _Measure:
    """Runs the measure on a model: output SQNR against cached float outputs, or a metric."""

    reference: list[Tensor]
    batches: list[Any]
    forward: Forward | None
    metric: Metric | None = None

    def __call__(self, model: nn.Module) -> float:
        if self.metric is not None:
            value = self.metric(model)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"metric must return a finite number, got {value!r}")
            return float(value)
        return output_sqnr(self.reference, flat_outputs(model, self.batches, self.forward))


def diagnose(
    float_model: nn.Module,
    config: QuantConfig,
    calib_data: Iterable[Any],
    eval_data: Iterable[Any],
    metric: Metric | None = None,
    *,
    forward: Forward | None = None,
    sweep: Sweep = "sqnr",
    by: By = "point",
    sweep_samples: int = 32,
    keep: int = 3,
    recover: float = 0.8,
    progress: bool = True,
) -> Diagnosis:
    """Which layers and functional ops of `float_model` quantized with `config` cost the most,
    and the fewest to keep in float that recover `recover` of the loss (at most `keep`).

    metric: model -> number, higher is better (accuracy, Spearman, ...), for the summary values
        and the kept-in-float steps; None: the model's output SQNR (dB) against the float model
        on all of `eval_data` (re-iterable batches, run as `forward(model, batch)` if given).
    sweep: "sqnr" (default) measures each point by the output SQNR on the first `sweep_samples`
        samples of `eval_data` (2 short passes per point); "metric" calls `metric` instead
        (2 full evaluations per point: slow on large models).
    by: "point" (each layer and op point) or "pattern": the points that differ only in block
        numbers as one (`by_pattern`), for models that repeat a block.
    """
    _check(float_model, config, metric, sweep, sweep_samples, keep, recover)
    if by not in ("point", "pattern"):
        raise ValueError(f"by must be 'point' or 'pattern', got {by!r}")
    start = time.perf_counter()
    first_batch(eval_data, "eval_data")
    float_model = copy.deepcopy(float_model).eval()
    qmodel = quantize(float_model, config, calib_data, forward=forward, progress=False)
    points = quantizer_points(qmodel)
    points = by_pattern(points) if by == "pattern" else points
    if not points:
        raise ValueError("config quantizes nothing in float_model: nothing to diagnose")
    batches = list(eval_data) if metric is None else []
    measure = _Measure(flat_outputs(float_model, batches, forward), batches, forward, metric)
    head = head_batches(eval_data, sweep_samples)
    per_point = (
        measure
        if sweep == "metric"
        else _Measure(flat_outputs(float_model, head, forward), head, forward)
    )
    summary = _summary_values(float_model, qmodel, points, measure)
    swept = _sweep(qmodel, points, per_point, progress)
    order = _greedy(qmodel, points, swept, per_point, keep, progress)
    steps = _steps(qmodel, points, order, measure, summary, recover, metric is None)
    ranked = _ranked(swept, order)
    return Diagnosis(
        measure="output SQNR dB vs float" if metric is None else "metric",
        sweep_measure="metric" if sweep == "metric" else f"output SQNR dB, {sweep_samples} samples",
        by=by,
        float_value=summary["float"],
        quantized=summary["quantized"],
        weights_only=summary["weights"],
        activations_only=summary["activations"],
        points=tuple(ranked),
        keep_float=steps[-1][0] if steps else (),
        steps=tuple(steps),
        seconds=time.perf_counter() - start,
    )


def _check(
    model: object,
    config: object,
    metric: object,
    sweep: object,
    sweep_samples: object,
    keep: object,
    recover: object,
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"float_model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a QuantConfig (see lowbit.presets), got {type(config).__name__}"
        )
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be None or callable (model -> number), got {metric!r}")
    if sweep not in ("sqnr", "metric"):
        raise ValueError(f"sweep must be 'sqnr' or 'metric', got {sweep!r}")
    if sweep == "metric" and metric is None:
        raise ValueError("sweep='metric' needs a metric")
    for name, value in (("sweep_samples", sweep_samples), ("keep", keep)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(recover, int | float) or not 0.0 < recover <= 1.0:
        raise ValueError(f"recover must be a share in (0, 1], got {recover!r}")


def _summary_values(
    float_model: nn.Module, qmodel: nn.Module, points: list[QuantizerPoint], measure: _Measure
) -> dict[str, float]:
    """The measure of the float model, the quantized one, weights only, activations only."""
    weights, activations = by_role(points)
    values = {"float": measure(float_model), "quantized": measure(qmodel)}
    with only(points, weights):
        values["weights"] = measure(qmodel)
    with only(points, activations):
        values["activations"] = measure(qmodel)
    return values


def _sweep(
    qmodel: nn.Module, points: list[QuantizerPoint], measure: _Measure, progress: bool
) -> dict[str, PointDiagnosis]:
    """Each point alone, and each point kept in float with the rest quantized."""
    swept = {}
    for p in progress_bar(points, "diagnose: points", enabled=progress):
        with only(points, p.quantizers):
            alone = measure(qmodel)
        with switched_off(p.quantizers):
            without = measure(qmodel)
        swept[p.name] = PointDiagnosis(p.name, p.kind, p.is_op, alone, without)
    return swept


def _greedy(
    qmodel: nn.Module,
    points: list[QuantizerPoint],
    swept: dict[str, PointDiagnosis],
    measure: _Measure,
    keep: int,
    progress: bool,
) -> list[str]:
    """Up to `keep` points, each the one whose float version helps most given those before."""
    order = [max(swept.values(), key=lambda d: d.without).name]
    by_name = {p.name: p for p in points}
    for _ in progress_bar(range(1, min(keep, len(points))), "diagnose: keep", enabled=progress):
        kept = [q for n in order for q in by_name[n].quantizers]
        gains = {}
        for p in points:
            if p.name not in order:
                with switched_off([*kept, *p.quantizers]):
                    gains[p.name] = measure(qmodel)
        order.append(max(gains, key=lambda n: gains[n]))
    return order


def _steps(
    qmodel: nn.Module,
    points: list[QuantizerPoint],
    order: list[str],
    measure: _Measure,
    summary: dict[str, float],
    recover: float,
    sqnr: bool,
) -> list[tuple[tuple[str, ...], float]]:
    """The measure keeping the first 1, 2, ... of `order` in float, until `recover` is met."""
    by_name = {p.name: p for p in points}
    steps: list[tuple[tuple[str, ...], float]] = []
    for k in range(1, len(order) + 1):
        with switched_off(q for n in order[:k] for q in by_name[n].quantizers):
            value = measure(qmodel)
        steps.append((tuple(order[:k]), value))
        if recovered_share(sqnr, summary["float"], summary["quantized"], value) >= recover:
            break
    return steps


def _ranked(swept: dict[str, PointDiagnosis], order: list[str]) -> list[PointDiagnosis]:
    """The greedy order first, then the rest by how much keeping each in float helps."""
    rest = sorted(
        (d for n, d in swept.items() if n not in order), key=lambda d: (-d.without, d.alone)
    )
    return [swept[n] for n in order] + rest
