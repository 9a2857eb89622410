"""Activation quantizers during block reconstruction: learned step sizes (LSQ, Esser et al.
2020) and QDrop's random float elements, in one autograd function per call.

The generic path (`numerics.fake_quantize` with a scale that requires grad, then a
`torch.where` for the dropped elements) takes about fifteen passes over each activation per
step, forward and backward; activations dominate the cost of a step on a CPU. For a per-tensor
quantizer the same values and gradients come from one function with a hand-written backward:

    y = s * (clamp(round(x / s) + z, qmin, qmax) - z)   where kept quantized, x where dropped
    dy/dx = 1 inside the clipping range (straight-through), 0 outside; 1 where dropped
    dy/ds = (q - z) - x / s inside, (q - z) outside (LSQ), scaled by 1 / sqrt(n * qmax); 0 where
    dropped
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.nn.quantizer import TensorQuantizer
from lowbit.spec import PerTensor

__all__ = ["activation_hook", "fused"]


def fused(q: TensorQuantizer) -> bool:
    """Whether `q` takes the fused path (per tensor, round to nearest); others keep their own
    forward."""
    return isinstance(q.spec.granularity, PerTensor) and q.spec.rounding == "nearest"


class _LsqDrop(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        scale: Tensor,
        zero: float,
        bounds: tuple[int, int],
        keep: Tensor | None,
    ) -> Tensor:
        v = x / scale
        r = torch.round(v).add_(zero)
        y = r.clamp(*bounds).sub_(zero).mul_(scale)
        if keep is not None:
            y = torch.where(keep, x, y)
        ctx.save_for_backward(v, scale, keep)
        ctx.zero, ctx.bounds = zero, bounds
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        v, scale, keep = ctx.saved_tensors
        zero, (qmin, qmax) = ctx.zero, ctx.bounds
        r = torch.round(v).add_(zero)
        inside = (r >= qmin) & (r <= qmax)
        ds = r.clamp_(qmin, qmax).sub_(zero).sub_(torch.where(inside, v, 0.0))
        if keep is not None:
            inside |= keep
            ds.masked_fill_(keep, 0.0)
        grad_x = torch.where(inside, g, 0.0)
        factor = 1.0 / math.sqrt(v.numel() * qmax)
        grad_s = (g * ds).sum().mul(factor).reshape(scale.shape)
        return grad_x, grad_s, None, None, None


def activation_hook(
    p: float, generator: torch.Generator
) -> Callable[[nn.Module, Any, Tensor], Tensor]:
    """A forward hook for an activation quantizer during reconstruction: the quantized output
    (fused for per-tensor quantizers, which are switched off meanwhile), with each element left
    float with probability `p` while gradients are on (learning, not measuring)."""

    def hook(q: nn.Module, args: Any, out: Tensor) -> Tensor:
        assert isinstance(q, TensorQuantizer)
        x = args[0]
        keep = None
        if p > 0 and torch.is_grad_enabled():
            # In x's memory layout, so that the output keeps it (channels-last, see brecq).
            keep = torch.empty_like(x).uniform_(generator=generator) < p
        if not fused(q):
            return out if keep is None else torch.where(keep, x, out)
        spec = q.spec
        zero = float(q.zero_point.reshape(()))
        result: Tensor = _LsqDrop.apply(x, q.scale, zero, (spec.qmin, spec.qmax), keep)
        return result

    return hook
