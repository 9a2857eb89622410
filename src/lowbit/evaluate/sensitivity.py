"""How much each layer's quantization costs, for `auto_quantize` (lowbit.evaluate.mixed_precision).

"output": the mean squared error of the model's outputs against the float model's, with only
that layer at the low precision, on the first calibration samples; "eval": the accuracy points
lost that way (one `eval_fn` call per layer); "local": each layer's own output noise-to-signal
ratio in the fully quantized model (one pass). In a process group every rank measures on its
shard and the errors and their weights are summed over the ranks in rank order, so every rank
ranks the layers alike.

Given a `lowbit.diagnose` result instead (`search_units`), nothing is measured here: the
diagnosis's points, in its order, are what the search keeps, functional-op points among them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lowbit.batches import Forward, flat_outputs, head_batches, run_batch
from lowbit.config import LayerQuant, QuantConfig
from lowbit.distributed import step, sum_over_ranks
from lowbit.evaluate.diagnosis import Diagnosis, by_pattern, quantizer_points
from lowbit.nn.modules import QuantModule
from lowbit.nn.op_points import ATTRIBUTE
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.progress import progress_bar
from lowbit.workflows.quantization import quantize

__all__ = [
    "Sensitivity",
    "SensitivityRun",
    "Units",
    "higher_modules",
    "point_of",
    "rank_layers",
    "search_units",
]

Sensitivity = Literal["output", "eval", "local"]


@dataclass(frozen=True)
class SensitivityRun:
    """What every step of one `auto_quantize` call shares: the float model (a private copy), its
    data and the caller's choices."""

    model: nn.Module
    config: QuantConfig
    calib_data: Iterable[Any]
    forward: Forward | None
    candidates: tuple[LayerQuant | None, ...]
    sensitivity: Sensitivity
    sensitivity_samples: int
    progress: bool
    group: Any

    def quantize(self, config: QuantConfig) -> nn.Module:
        """A quantized copy of the float model (the float model itself is never changed)."""
        return quantize(
            self.model,
            config,
            self.calib_data,
            forward=self.forward,
            progress=False,
            group=self.group,
        )


def rank_layers(
    run: SensitivityRun,
    low: nn.Module,
    high: nn.Module,
    names: tuple[str, ...],
    drop: Callable[[nn.Module], float],
) -> tuple[tuple[str, float], ...]:
    """Layers with their sensitivity, most sensitive first: each layer alone at low precision in
    the `high` model ("output", "eval"), or each layer's own error in `low` ("local"). In a
    group, the errors and their weights are summed over the ranks (in rank order)."""
    if run.sensitivity == "eval":
        scores = {}
        for name in progress_bar(names, "auto_quantize: sensitivity", enabled=run.progress):
            with _alone_at_low(high, low, name):
                scores[name] = drop(high)
    else:
        batches = head_batches(run.calib_data, run.sensitivity_samples)
        with step(run.group, "auto_quantize's sensitivity"):
            if run.sensitivity == "local":
                noise, signal = _local_noise(low, names, batches, run.forward)
            else:
                noise, signal = _output_errors(run, low, high, names, batches)
        totals = sum_over_ranks([*noise, *signal], run.group)
        noise, signal = totals[: len(names)], totals[len(names) :]
        scores = {n: e / max(w, 1e-30) for n, e, w in zip(names, noise, signal, strict=True)}
    return tuple(sorted(scores.items(), key=lambda kv: -kv[1]))


@dataclass(frozen=True)
class Units:
    """What the search keeps in higher precision, unit by unit: each layer; or, given a
    diagnosis, each of its points (a layer, an op point, or a pattern of several), in its order."""

    paths: dict[str, tuple[str, ...]]  # unit -> the submodules swapped to keep it
    ops: frozenset[str]  # units that are op points: kept in float
    ranking: tuple[tuple[str, float], ...]  # the diagnosis's order; () to measure one


def search_units(low: nn.Module, names: tuple[str, ...], diagnosis: Diagnosis | None) -> Units:
    """The units of the search: the layers, or the points of `diagnosis` found in `low`."""
    if diagnosis is None:
        return Units({n: (n,) for n in names}, frozenset(), ())
    if not isinstance(diagnosis, Diagnosis):
        raise TypeError(f"diagnosis must be a lowbit.diagnose result, got {diagnosis!r}")
    points = quantizer_points(low)
    found = {p.name: p for p in (by_pattern(points) if diagnosis.by == "pattern" else points)}
    named = [p.name for p in diagnosis.points]
    if set(named) != set(found):
        unknown = sorted(set(named) - set(found)) or sorted(set(found) - set(named))
        raise ValueError(
            f"diagnosis: its points are not those config quantizes in model (e.g. "
            f"{', '.join(unknown[:3])}): diagnose the same model with the same config"
        )
    return Units(
        {n: found[n].paths for n in named},
        frozenset(n for n in named if found[n].is_op),
        tuple((p.name, p.without) for p in diagnosis.points),
    )


def higher_modules(low: nn.Module, high: nn.Module, units: Units) -> dict[str, nn.Module]:
    """Each unit's submodules at the higher precision: a layer as `high` has it, an op point's
    quantizer as `low` has it but switched off (float: no Q/DQ in the export either)."""
    modules: dict[str, nn.Module] = {}
    for unit, paths in units.paths.items():
        for path in paths:
            if unit in units.ops:
                quantizer = copy.deepcopy(low.get_submodule(path))
                assert isinstance(quantizer, TensorQuantizer)  # an op point's quantizer
                quantizer.set_mode("off")
                modules[path] = quantizer
            else:
                modules[path] = high.get_submodule(path)
    return modules


def point_of(path: str) -> str:
    """The summary's name of a unit's submodule: a layer's path, or an op point's name
    ("blocks.3.lowbit_ops.add_0" -> "blocks.3.add_0")."""
    holder, _, local = path.rpartition(".")
    if holder != ATTRIBUTE and not holder.endswith(f".{ATTRIBUTE}"):
        return path
    caller = holder.removesuffix(ATTRIBUTE).removesuffix(".")
    return f"{caller}.{local}" if caller else local


@contextmanager
def _alone_at_low(high: nn.Module, low: nn.Module, name: str) -> Iterator[None]:
    """`high` with its layer `name` swapped for `low`'s, for the body only."""
    kept = high.get_submodule(name)
    high.set_submodule(name, low.get_submodule(name))
    try:
        yield
    finally:
        high.set_submodule(name, kept)


def _output_errors(
    run: SensitivityRun, low: nn.Module, high: nn.Module, names: tuple[str, ...], batches: list[Any]
) -> tuple[list[float], list[float]]:
    """Per layer alone at low precision: the summed mean squared error of the outputs against
    the float model's over `batches`, and the number of batches."""
    reference = flat_outputs(run.model, batches, run.forward)
    errors = []
    for name in progress_bar(names, "auto_quantize: sensitivity", enabled=run.progress):
        with _alone_at_low(high, low, name):
            outputs = flat_outputs(high, batches, run.forward)
        pairs = zip(outputs, reference, strict=True)
        errors.append(float(sum(((a - b) ** 2).mean() for a, b in pairs)))
    return errors, [float(len(batches))] * len(names)


def _local_noise(
    low: nn.Module, names: tuple[str, ...], batches: list[Any], forward: Forward | None
) -> tuple[list[float], list[float]]:
    """Per layer: the energy of its output's error against its float layer on the same input,
    and of the float output (their ratio is the noise-to-signal ratio)."""
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)

    def make_hook(name: str) -> Callable[[QuantModule, tuple[Any, ...], Any], None]:
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
    return [noise[n] for n in names], [signal[n] for n in names]
