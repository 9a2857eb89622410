"""AdaRound's optimisation of one layer, in fixed blocks of output channels that ranks share.

The layer's loss is a sum over its output channels and Adam works weight by weight, so blocks
of channels can be optimised apart. The blocks are fixed by the layer alone: 64 output channels
(or 64 groups of a grouped convolution), the last one padded, a layer with fewer one block. They
are stacked and every block is computed with the same shapes whatever blocks a process holds:
a batched matrix product per block, element-wise operations over whole vector lanes (a block
holds a multiple of 64 weights). Each block stops on its own once all but 0.1% of its weights
are decided, keeping its V while the others go on, and draws the same rows at each step, so a
block's rounding never depends on which others it was stacked with. Inside a process group rank
r learns blocks r, r + N, ... and the ranks exchange each block's rounding: one process and N
give the same codes (with one thread per process, as the tests run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lowbit.algorithms._rounding import (
    RoundingSchedule,
    SoftRounding,
    optimize_rounding,
    rectified_sigmoid,
)
from lowbit.distributed import gather_objects, rank, step
from lowbit.nn.modules import QuantModule

__all__ = ["BLOCK_UNITS", "LayerRounding", "learn_rounding"]

BLOCK_UNITS = 64


@dataclass(frozen=True)
class LayerRounding:
    """One layer's result: output MSE with nearest rounding and with the learned one, the
    fraction of codes changed, and the Adam steps its slowest block ran."""

    mse_nearest: float
    mse_learned: float
    flipped: float
    steps: int


@dataclass(frozen=True)
class _Layout:
    """Units (output channels, or groups of a grouped convolution) of `per_unit` output
    channels and `k` inputs each, in `blocks` blocks of `size` units."""

    groups: int
    units: int
    per_unit: int
    k: int
    size: int
    blocks: int

    @staticmethod
    def of(weight: Tensor, groups: int) -> _Layout:
        units = weight.shape[0] if groups == 1 else groups
        per_unit = weight.shape[0] // units
        size = min(units, BLOCK_UNITS)
        return _Layout(groups, units, per_unit, weight[0].numel(), size, math.ceil(units / size))

    def stack(self, t: Tensor, fill: float, mine: list[int]) -> Tensor:
        """A weight-shaped tensor as this rank's blocks [m, size, per_unit, k], padded."""
        u = t.reshape(self.units, self.per_unit, self.k)
        pad = self.blocks * self.size - self.units
        if pad:
            u = torch.cat([u, u.new_full((pad, self.per_unit, self.k), fill)])
        return u.reshape(self.blocks, self.size, self.per_unit, self.k)[mine]

    def unit_rows(self, x: Tensor, mine: list[int]) -> Tensor:
        """Rows [R, groups, k] of a grouped layer as this rank's [m, size, R, k]."""
        u = x.permute(1, 0, 2)
        pad = self.blocks * self.size - self.units
        if pad:
            u = torch.cat([u, u.new_zeros((pad, *u.shape[1:]))])
        return u.reshape(self.blocks, self.size, *u.shape[1:])[mine]


class _Products:
    """Each stacked block's output on its rows: one matrix product per block, alike on every
    rank (a layer without groups shares one row matrix among its blocks)."""

    def __init__(self, layout: _Layout, x: Tensor, mine: list[int]) -> None:
        self.layout, self.m = layout, len(mine)
        self.x = x[:, 0, :] if layout.groups == 1 else layout.unit_rows(x, mine)

    def rows(self) -> int:
        return self.x.shape[-2]

    def __call__(self, w: Tensor, idx: Tensor | None = None) -> Tensor:
        lay, m = self.layout, self.m
        if lay.groups == 1:
            x = self.x if idx is None else self.x[idx]
            return torch.bmm(x.expand(m, *x.shape), w.reshape(m, lay.size, lay.k).transpose(1, 2))
        x = self.x if idx is None else self.x[:, :, idx]
        flat_w = w.reshape(m * lay.size, lay.per_unit, lay.k).transpose(1, 2)
        return torch.bmm(x.reshape(m * lay.size, x.shape[-2], lay.k), flat_w)

    def second_moments(self, other: Tensor) -> Tensor:
        """x^T other / R per unit ([k, k], or [m * size, k, k] for a grouped layer)."""
        x, n = self.x, self.rows()
        if self.layout.groups == 1:
            return x.T @ other / n
        flat = x.reshape(-1, n, self.layout.k)
        return torch.bmm(flat.transpose(1, 2), other.reshape(flat.shape)) / n

    def times(self, w: Tensor, h: Tensor) -> Tensor:
        """w [m, size, per_unit, k] times the per-unit matrix `h` on the right."""
        lay, m = self.layout, self.m
        if lay.groups == 1:
            return torch.bmm(w.reshape(m, lay.size, lay.k), h.expand(m, lay.k, lay.k))
        return torch.bmm(w.reshape(m * lay.size, lay.per_unit, lay.k), h)


def _loss(
    products: _Products, xf: _Products, w_float: Tensor, batch_rows: int, gen: torch.Generator
) -> Callable[[Tensor], Tensor]:
    """The summed loss ||W~ xq - W xf||^2 / R of the stacked blocks: exact from second moments
    where the patches or the rows are few, else on `batch_rows` rows drawn per step."""
    lay, n_rows = products.layout, products.rows()
    if lay.k <= batch_rows or n_rows <= batch_rows:
        hqq = products.second_moments(products.x)
        cross = products.times(w_float, products.second_moments(xf.x).transpose(-1, -2))

        def exact(w: Tensor) -> Tensor:
            flat = w.reshape(cross.shape)
            return (products.times(w, hqq) * flat).sum() - 2 * (cross * flat).sum()

        return exact
    target = xf(w_float)

    def sampled(w: Tensor) -> Tensor:
        idx = torch.randint(n_rows, (batch_rows,), generator=gen)
        return (products(w, idx) - target[:, idx]).pow(2).sum() / batch_rows

    return sampled


def learn_rounding(
    qm: QuantModule,
    xq: Tensor,
    xf: Tensor,
    schedule: RoundingSchedule,
    batch_rows: int,
    seed: int,
    group: Any,
) -> LayerRounding:
    """Learn the rounding of `qm`'s weight so that W~ xq matches W xf on rows [R, groups, K],
    this rank's blocks only, then every block's from the rank that learned it; writes it."""
    weight: Tensor = qm.module.weight
    lay = _Layout.of(weight, xq.shape[1])
    world = 1 if group is None else torch.distributed.get_world_size(group)
    mine = list(range(rank(group), lay.blocks, world))
    ups: dict[int, Tensor] = {}
    steps: dict[int, int] = {}
    with step(group, "AdaRound"):
        if mine:
            stacked = SoftRounding(qm, lambda t, fill: lay.stack(t, fill, mine))
            loss = _loss(
                _Products(lay, xq, mine),
                _Products(lay, xf, mine),
                stacked.w,
                batch_rows,
                torch.Generator().manual_seed(seed),
            )
            stops = _BlockStops(stacked, lay, mine, schedule.undecided)
            last = optimize_rounding(
                [stacked],
                lambda: loss(stacked.soft()),
                schedule,
                after_step=stops.hold,
                decided=stops.decided,
            )
            for i, b in enumerate(mine):
                ups[b] = (stacked.v.detach()[i] >= 0).clone()
                steps[b] = stops.stopped.get(i, last)
    for shard in gather_objects((ups, steps), group):
        ups.update(shard[0])
        steps.update(shard[1])
    return _finish(qm, lay, ups, max(steps.values()), xq, xf)


class _BlockStops:
    """Which stacked blocks decided (all but a share `undecided` of their real weights at 0 or
    1), when, and their V held from then on."""

    def __init__(self, stacked: SoftRounding, lay: _Layout, mine: list[int], share: float):
        self.stacked = stacked
        self.stopped: dict[int, int] = {}
        real = torch.zeros(len(mine), lay.size, 1, 1, dtype=torch.bool)
        for i, b in enumerate(mine):
            real[i, : min(lay.size, lay.units - b * lay.size)] = True
        self.real = real
        self.allowed = share * real.sum((1, 2, 3)).double() * lay.per_unit * lay.k
        self.held = stacked.v.detach().clone()
        self.frozen = torch.zeros(len(mine), 1, 1, 1, dtype=torch.bool)
        self.steps = 0

    def hold(self) -> None:
        self.steps += 1
        if bool(self.frozen.any()):
            with torch.no_grad():
                self.stacked.v.copy_(torch.where(self.frozen, self.held, self.stacked.v))

    def decided(self) -> bool:
        h = rectified_sigmoid(self.stacked.v.detach())
        open_ = (((h > 0) & (h < 1)) & self.real).sum((1, 2, 3))
        for i in range(len(open_)):
            if i not in self.stopped and float(open_[i]) <= float(self.allowed[i]):
                self.stopped[i] = self.steps
                self.frozen[i] = True
                self.held[i] = self.stacked.v.detach()[i]
        return len(self.stopped) == len(open_)


def _finish(
    qm: QuantModule, lay: _Layout, ups: dict[int, Tensor], steps: int, xq: Tensor, xf: Tensor
) -> LayerRounding:
    """Write the learned codes unless nearest rounding does better on the rows."""
    full = SoftRounding(qm)
    blocks = torch.stack([ups[b] for b in range(lay.blocks)])
    up = blocks.reshape(-1, lay.per_unit, lay.k)[: lay.units].reshape(full.w.shape)
    nearest, learned = full.nearest(), full.learned(up)
    mse_nearest, mse_learned = _mse(nearest, full.w, xq, xf), _mse(learned, full.w, xq, xf)
    if mse_learned > mse_nearest:  # too few iterations to beat nearest: keep nearest
        learned, mse_learned = nearest, mse_nearest
    return LayerRounding(mse_nearest, mse_learned, full.write(learned), steps)


def _mse(w_new: Tensor, w: Tensor, xq: Tensor, xf: Tensor) -> float:
    """Output MSE of `w_new` on the quantized inputs against the float layer, in float64."""
    groups = xq.shape[1]
    with torch.no_grad():
        total = 0.0
        new, ref = (t.reshape(groups, t.shape[0] // groups, -1).double() for t in (w_new, w))
        for a, b in zip(xq.split(2048), xf.split(2048), strict=True):
            out = torch.einsum("rgk,gok->rgo", a.double(), new)
            total += float((out - torch.einsum("rgk,gok->rgo", b.double(), ref)).pow(2).sum())
        return total / xq.shape[0]
