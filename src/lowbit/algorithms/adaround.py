"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Rounding every weight to its nearest grid point minimizes each weight's own error, not the
layer's output error: at 4 bits the two differ a lot. AdaRound learns, for each weight, whether
to round down or up. With W/s = floor(W/s) + frac, the weight becomes
s * (floor(W/s) + h(V) - z) with h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), the rectified
sigmoid, and V (one per weight, started where h(V) = frac) minimizes

    || W x - W~(V) x ||^2  (summed over output channels, mean over sampled rows)
      + lambda * sum(1 - |2 h(V) - 1|^beta)

with Adam; the regularizer, switched on after a warm start of 20% of the iterations with beta
annealed from 20 to 2, drives every h(V) to 0 or 1. The final codes are floor(W/s) + [V >= 0]:
each differs from rounding to nearest by at most one step.

Layer by layer, in one forward pass: the calibration batches are joined into one (at most
`max_samples` samples) and a hook on each quantized layer, just before it runs, optimizes its
rounding with the inputs it actually receives: from upstream layers already AdaRounded, after
its own input quantizer. The target is the float model's output of that layer on the float
model's own input (as AIMET and BRECQ do), so each layer also makes up for some of the error
that reaches it from upstream. The float model runs alongside in a second thread, paused at the
same layer. Memory per layer: `rows` sampled input patches of each model (rows of a Linear's
input, patches at the same random output positions of a convolution, over all images). Where the
patches are short (depthwise and narrow convolutions), the loss is computed exactly from their
second moments, the cost of a step not depending on the number of rows.

Each layer is learned in fixed blocks of 64 output channels (`_round_blocks`), which the
ranks of a process group divide among them, with the codes of one process.

At the end each layer's float weight is overwritten with its dequantized learned codes (scale and
zero point unchanged), so the existing weight quantizer reproduces exactly those codes: the
model, its export and `lowbit.convert` need nothing new.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.algorithms._lockstep import Lockstep, float_copy
from lowbit.algorithms._round_blocks import learn_rounding
from lowbit.algorithms._rounding import RoundingSchedule, rounding_unsupported
from lowbit.algorithms._sequential import (
    check_qmodel,
    concat_batches,
    conv_call,
    layer_progress,
    pick_rows,
    rows_at,
    summary_text,
)
from lowbit.batches import Forward, run_hooked
from lowbit.distributed import active_group
from lowbit.exceptions import LowbitWarning
from lowbit.nn.modules import QuantModule

__all__ = ["AdaRoundLayer", "AdaRoundReport", "adaround"]


@dataclass(frozen=True)
class AdaRoundLayer:
    """One layer: output MSE on its sampled rows with nearest rounding and with AdaRound."""

    name: str
    rows: int
    mse_nearest: float
    mse_adaround: float
    flipped: float  # fraction of weights whose code differs from rounding to nearest
    seconds: float
    steps: int = 0  # Adam steps run (fewer than `iterations` when the rounding decided early)


@dataclass(frozen=True)
class AdaRoundReport:
    layers: tuple[AdaRoundLayer, ...]
    skipped: tuple[tuple[str, str], ...]
    seconds: float

    def __str__(self) -> str:
        head = f"lowbit: AdaRound of {len(self.layers)} layer(s) in {self.seconds:.0f}s"
        rows = [
            f"{r.name}: output MSE {r.mse_nearest:.3g} -> {r.mse_adaround:.3g} "
            f"({100 * r.flipped:.1f}% of codes changed, {r.steps} steps, {r.seconds:.1f}s)"
            for r in self.layers
        ]
        return summary_text(head, rows, self.skipped)


def adaround(
    qmodel: nn.Module,
    calib_data: Iterable[Any],
    *,
    iterations: int = 1000,
    lr: float = 1e-2,
    reg_weight: float = 0.01,
    rows: int = 4096,
    batch_rows: int = 512,
    max_samples: int | None = 128,
    seed: int = 0,
    forward: Forward | None = None,
    progress: bool = True,
    group: Any = None,
) -> nn.Module:
    """Learn the rounding of every quantized layer's weights, in place; returns `qmodel`.

    qmodel: a model from `lowbit.quantize` (uniform, static weight quantizers; others are
        skipped and listed). Weight scales stay as calibrated. Its float weights are the
        reference, so run AdaRound on a freshly quantized model.
    calib_data: calibration batches, joined into one of at most `max_samples` samples (inside
        torch.distributed, or with `group=`, every rank's shard joined in rank order).
    iterations, lr, reg_weight: Adam steps per layer, its learning rate, and lambda.
    rows: input rows (patches) sampled per layer; batch_rows: rows per Adam step (layers whose
        patches are at most this long use all rows at every step, through their second moments).

    `qmodel.lowbit_adaround` reports each layer's output MSE with nearest rounding and with
    AdaRound, and the time taken.
    """
    layers = check_qmodel(qmodel)
    _check_settings(iterations=iterations, rows=rows, batch_rows=batch_rows)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not reg_weight >= 0:
        raise ValueError(f"reg_weight must be >= 0, got {reg_weight!r}")
    targets, skipped = _targets(layers)
    group = active_group(group)
    batch = concat_batches(calib_data, max_samples, group)
    start = time.perf_counter()
    qmodel.eval()
    reference = float_copy(qmodel)
    ref_layers = {n: _quant_module(reference, n) for n in targets}
    settings = _Settings(RoundingSchedule(iterations, lr, reg_weight), rows, batch_rows)
    with (
        layer_progress("AdaRound", len(targets), progress) as advance,
        Lockstep(reference, ref_layers, batch, forward, "AdaRound") as lockstep,
    ):
        generator = torch.Generator().manual_seed(seed)
        run = _Run(settings, generator, lockstep, ref_layers, advance, group)
        handles = [qm.register_forward_pre_hook(run.hook(n)) for n, qm in targets.items()]
        run_hooked(qmodel, batch, forward, handles)
    never = [n for n in targets if n not in run.seen]
    skipped += run.skipped + [(n, "did not run on the calibration data") for n in never]
    if never:
        warnings.warn(
            f"AdaRound: {len(never)} layer(s) never ran and keep rounding to nearest: {never[:5]}",
            LowbitWarning,
            stacklevel=2,
        )
    report = AdaRoundReport(tuple(run.done), tuple(skipped), time.perf_counter() - start)
    qmodel.lowbit_adaround = report  # type: ignore[assignment]
    return qmodel


def _check_settings(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _targets(
    layers: dict[str, QuantModule],
) -> tuple[dict[str, QuantModule], list[tuple[str, str]]]:
    """The layers AdaRound can optimize, and (name, why) for the quantized ones it cannot."""
    targets: dict[str, QuantModule] = {}
    skipped: list[tuple[str, str]] = []
    for name, qm in layers.items():
        why = rounding_unsupported(qm)
        if why is None:
            targets[name] = qm
        elif qm.weight_quantizer is not None:
            skipped.append((name, why))
    if not targets:
        raise ValueError(
            "qmodel has no layer AdaRound can optimize (uniform, static weight quantizers on "
            f"Linear / Conv1d / Conv2d): {skipped[:3]}"
        )
    return targets, skipped


@dataclass(frozen=True)
class _Settings:
    schedule: RoundingSchedule
    rows: int
    batch_rows: int


@dataclass
class _Run:
    """The pass over the quantized model: a hook per layer learns its rounding on the inputs it
    receives, against the float model's input of the same layer (from `lockstep`)."""

    settings: _Settings
    generator: torch.Generator
    lockstep: Lockstep
    ref_layers: dict[str, QuantModule]
    advance: Callable[[str], None]
    group: Any = None
    seen: set[str] = field(default_factory=set)
    done: list[AdaRoundLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def hook(self, name: str) -> Callable[[QuantModule, tuple[Any, ...]], None]:
        def pre_hook(qm: QuantModule, args: tuple[Any, ...]) -> None:
            if name not in self.seen and args and isinstance(args[0], Tensor):
                self.seen.add(name)
                self.layer(name, qm, args[0])

        return pre_hook

    def layer(self, name: str, qm: QuantModule, x: Tensor) -> None:
        f_args, _ = self.lockstep.take(name)
        try:
            if not f_args or not isinstance(f_args[0], Tensor):
                raise TypeError(f"layer {name!r}: first input is not a tensor")
            x = x if qm.input_quantizer is None else qm.input_quantizer(x)
            call = conv_call(qm.module, x)
            ref_call = conv_call(self.ref_layers[name].module, f_args[0])
        except TypeError as error:
            self.lockstep.release()
            self.skipped.append((name, str(error)))
            return
        t0 = time.perf_counter()
        pick = pick_rows(call, _rows_for(qm, self.settings.rows), self.generator)
        xq, xf = rows_at(call, pick), rows_at(ref_call, pick)
        del call, ref_call, f_args
        self.lockstep.release()
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        settings = self.settings
        got = learn_rounding(qm, xq, xf, settings.schedule, settings.batch_rows, seed, self.group)
        seconds = time.perf_counter() - t0
        self.done.append(
            AdaRoundLayer(
                name, xq.shape[0], got.mse_nearest, got.mse_learned, got.flipped, seconds, got.steps
            )
        )
        self.advance(name)


def _quant_module(model: nn.Module, name: str) -> QuantModule:
    module = model.get_submodule(name)
    assert isinstance(module, QuantModule)
    return module


def _rows_for(qm: QuantModule, rows: int) -> int:
    """Fewer rows for layers with very wide patches, to keep one layer's rows under ~128 MB."""
    weight: Tensor = qm.module.weight
    groups = int(getattr(qm.module, "groups", 1))
    per_row = weight[0].numel() * groups
    return max(256, min(rows, (32 * 2**20) // max(per_row, 1)))
