"""Learned rounding (AdaRound, Nagel et al. 2020): the one optimisation core that AdaRound (one
layer at a time) and BRECQ / QDrop (a block of layers at a time) share.

A weight W on its quantizer's grid (scale s, zero point z) becomes

    W~(V) = s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z),
    h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)          (the rectified sigmoid)

with V started where h(V) = frac(W/s). Adam minimises a reconstruction loss (given by the caller:
a layer's or a block's output error) plus lambda * sum(1 - |2 h(V) - 1|^beta): after a warm start
(20% of the iterations) the regulariser is switched on with beta annealed from 20 to 2, which
drives every h(V) to 0 or 1. The final codes are floor(W/s) + [V >= 0], each at most one step
from rounding to nearest.

Stopping early: once h(V) sits at exactly 0 or 1 the clip passes no gradient and further steps
cannot change that weight's rounding; the loop stops when all but a share `undecided` (0.1%) of
the weights got there (checked every `check_every` steps). Extra
parameters (BRECQ's activation step sizes) may be optimised alongside, each at its own rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit import numerics
from lowbit.algorithms._sequential import full_param
from lowbit.nn.modules import QuantModule
from lowbit.nn.quantizer import TensorQuantizer

__all__ = [
    "RoundingSchedule",
    "SoftRounding",
    "optimize_rounding",
    "rectified_sigmoid",
    "rounding_unsupported",
]

ZETA, GAMMA = 1.1, -0.1
WARM_START = 0.2
BETA_RANGE = (20.0, 2.0)


def rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_unsupported(qm: QuantModule) -> str | None:
    """Why the weight of `qm` cannot take a learned rounding, or None if it can."""
    q = qm.weight_quantizer
    if q is None:
        return "no weight quantizer"
    if q.spec.scheme != "uniform":
        return f"scheme {q.spec.scheme!r} (learned rounding needs a uniform grid)"
    if q.dynamic or q.learnable or not q.has_qparams:
        return "weight quantizer is dynamic or learnable (a QAT model?)"
    if not isinstance(qm.module, nn.Linear | nn.Conv1d | nn.Conv2d):
        return f"{type(qm.module).__name__} is not supported (Linear, Conv1d, Conv2d)"
    return None


class SoftRounding(nn.Module):
    """One layer's rounding variables V and its weight on the quantizer's grid.

    As a module it stands in for the layer's weight quantizer during a block's reconstruction
    (a forward hook on the quantizer replaces its output by `soft()`).

    `arrange(t, fill)` lays the weight-shaped tensors out otherwise (AdaRound's stacked blocks of
    output channels, padded with `fill`): `soft`, `regularizer` and `undecided` then work in
    that layout; `nearest`, `learned` and `write` need the layer's own (no `arrange`)."""

    def __init__(
        self, qm: QuantModule, arrange: Callable[[Tensor, float], Tensor] | None = None
    ) -> None:
        super().__init__()
        quantizer = qm.weight_quantizer
        assert quantizer is not None
        self.quantizer: TensorQuantizer = quantizer
        self.spec = quantizer.spec
        self.weight: Tensor = qm.module.weight
        w = self.weight.detach().float()
        scale = full_param(quantizer.scale.detach().float(), w, self.spec.granularity)
        zero = full_param(quantizer.zero_point.float(), w, self.spec.granularity)
        floor = torch.floor(w / scale)
        frac = (w / scale - floor).clamp(0.0, 1.0)
        if arrange is not None:
            w, scale, zero = arrange(w, 0.0), arrange(scale, 1.0), arrange(zero, 0.0)
            floor, frac = arrange(floor, 0.0), arrange(frac, 0.0)
        self.w, self.scale, self.zero, self.floor = w, scale, zero, floor
        v = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)
        self.v = nn.Parameter(v.clamp(-10.0, 10.0))

    def dequant(self, h: Tensor) -> Tensor:
        q = torch.clamp(self.floor + h + self.zero, self.spec.qmin, self.spec.qmax)
        return (q - self.zero) * self.scale

    def soft(self) -> Tensor:
        """The weight with the current soft rounding h(V), differentiable in V."""
        return self.dequant(rectified_sigmoid(self.v)).to(self.weight.dtype)

    def regularizer(self, beta: float) -> Tensor:
        h = rectified_sigmoid(self.v)
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()

    def undecided(self) -> int:
        """How many weights have h(V) strictly between 0 and 1 (still able to move)."""
        h = rectified_sigmoid(self.v.detach())
        return int(((h > 0) & (h < 1)).sum())

    def nearest(self) -> Tensor:
        q = self.quantizer
        codes = numerics.quantize(self.w, q.scale, q.zero_point, self.spec)
        return numerics.dequantize(codes, q.scale, q.zero_point, self.spec)

    def learned(self, up: Tensor | None = None) -> Tensor:
        """The weight with the hard rounding floor(W/s) + [V >= 0] (or + `up`, a bool tensor
        of the weight's shape: which weights round up)."""
        hard = (self.v.detach() >= 0 if up is None else up).float()
        spec = self.spec
        codes = torch.clamp(self.floor + hard + self.zero, spec.qmin, spec.qmax)
        q = self.quantizer
        return numerics.dequantize(codes.to(spec.storage_dtype), q.scale, q.zero_point, spec)

    def write(self, weight: Tensor) -> float:
        """Overwrite the layer's float weight with `weight` (dequantized codes, so its quantizer
        reproduces them exactly); returns the fraction that differs from rounding to nearest."""
        with torch.no_grad():
            flipped = float((weight != self.nearest()).float().mean())
            self.weight.copy_(weight.to(self.weight.dtype))
        return flipped


@dataclass(frozen=True)
class RoundingSchedule:
    """Adam steps, learning rates and the regulariser of the rounding optimisation."""

    iterations: int
    lr: float
    reg_weight: float
    check_every: int = 25
    # Stop once at most this share of the weights is undecided (their final rounding by the sign
    # of V is then already as good as settled).
    undecided: float = 1e-3

    def beta(self, step: int) -> float | None:
        """The regulariser's beta at `step`, None during the warm start."""
        warm = int(WARM_START * self.iterations)
        if step < warm or self.reg_weight <= 0:
            return None
        progress = (step - warm) / max(1, self.iterations - warm)
        return BETA_RANGE[1] + (BETA_RANGE[0] - BETA_RANGE[1]) * (1.0 - progress)


def optimize_rounding(
    roundings: Sequence[SoftRounding],
    loss_fn: Callable[[], Tensor],
    schedule: RoundingSchedule,
    extra: Sequence[tuple[Tensor, float]] = (),
    after_step: Callable[[], None] | None = None,
    decided: Callable[[], bool] | None = None,
) -> int:
    """Adam on every V of `roundings` (and each `extra` tensor, at its own learning rate)
    against `loss_fn()` + the rounding regulariser; returns the number of steps run (fewer than
    `schedule.iterations` when every rounding decided early). `decided()`, asked at each check
    instead of the share of undecided weights, says when to stop."""
    groups: list[dict[str, object]] = [{"params": [r.v for r in roundings], "lr": schedule.lr}]
    groups += [{"params": [t], "lr": lr} for t, lr in extra]
    optimizer = torch.optim.Adam(groups)
    total = sum(r.v.numel() for r in roundings)
    with torch.enable_grad():
        for step in range(schedule.iterations):
            loss = loss_fn()
            beta = schedule.beta(step)
            if beta is not None:
                loss = loss + schedule.reg_weight * sum(
                    (r.regularizer(beta) for r in roundings), torch.zeros(())
                )
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the reconstruction loss is {value} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            if beta is None or (step + 1) % schedule.check_every != 0:
                continue
            if decided is not None:
                if decided():
                    return step + 1
            elif sum(r.undecided() for r in roundings) <= schedule.undecided * total:
                return step + 1
    return schedule.iterations


def search_weight_scale(quantizer: TensorQuantizer, weight: Tensor, steps: int = 20) -> None:
    """Shrink each unit's weight scale to the clipping with the least squared weight error,
    scale * a for a in 0.5 .. 1 (`steps` + 1 values), as BRECQ and QDrop initialise their weight
    quantizers: at 4 bits the min-max range wastes levels on a few outliers. Symmetric
    quantizers only (an affine one keeps its range)."""
    spec = quantizer.spec
    if not spec.symmetric:
        return
    w = weight.detach().float()
    s0, zero = quantizer.scale.detach().float(), quantizer.zero_point
    best, best_err = s0, torch.full_like(s0, math.inf)
    with torch.no_grad():
        for a in torch.linspace(0.5, 1.0, steps + 1).tolist():
            scale = s0 * a
            err = (numerics.fake_quantize(w, scale, zero, spec) - w).pow(2)
            e = numerics.reduce_by(err, spec.granularity, lambda r: r.sum(1)).reshape(s0.shape)
            better = e < best_err
            best, best_err = torch.where(better, scale, best), torch.where(better, e, best_err)
    quantizer.set_qparams(best, zero)
