"""A sum of X^T X over calibration batches that does not depend on how the batches are split.

GPTQ needs H = 2 X^T X / n over every calibration row. Summed in floating point, the result
depends on the order of the additions, so a sharded calibration (each rank's partial sum, then an
all-reduce) could differ from one process in the last bits, and a rounding of the solve with it.

`GramSum` makes the sum exact instead. Each batch's product P = X^T X is computed in float64 (the
same bits on whichever rank holds that batch), then put on a fixed-point grid of its own: with E
the power of two above max |P| rounded up to a multiple of 8, P becomes the integers
round(P * 2^(47 - E)) (at most 2^47 in magnitude; the rounding error is at most 2^-48 of 2^E, far
below the float64 rounding of the sum itself). Batches with the same E add up as int64, which is
exact and associative; the ranks all-reduce each E's integer sum (exact), and only then does
every rank turn the integer sums into float64, in increasing E, from the same integers. The result
is therefore the same bits for any split of the batches over any number of processes, and any
order of them.

Overflow: a grid holds at most 2^15 batches (2^15 * 2^47 < 2^63), checked over all ranks.
Memory: one int64 [columns, columns] matrix per distinct E (batches of similar magnitude share
one; a layer's inputs rarely span more than a few). Both the conversion of a product onto its grid
and of the grids into the float64 result go a slab of rows at a time (elementwise work: the same
bits as whole-matrix operations), so neither holds a full-size temporary beside its operands; and
`total` releases each grid once it is added, so a model's widest layer (4096 or 11008 inputs:
128 MB or 970 MB per matrix) costs its grids and one float64 result, not twice that.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lowbit.distributed import all_reduce, gather_objects

__all__ = ["GramSum"]

_MANTISSA_BITS = 47  # |grid integer| <= 2^47 per batch
_MAX_BATCHES = 2**15  # per grid: 2^15 * 2^47 = 2^62 < 2^63
_GRID_STEP = 8  # E rounded up to a multiple of this: fewer grids, 7 bits less per entry at most
_SLAB = 1 << 20  # elements converted at a time (8 MB of float64)


class GramSum:
    """Exact, split-independent sum of the products X^T X of many batches of rows X."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.columns = columns
        self.device = torch.device(device)
        self.grids: dict[int, Tensor] = {}  # E -> int64 sum of the batches on that grid
        self.batches: dict[int, int] = {}  # E -> how many batches it holds
        self.rows = 0

    def add(self, product: Tensor, rows: int) -> None:
        """Add one batch's X^T X (float64, computed by the caller) over `rows` rows."""
        self.rows += rows
        # X^T X: no entry exceeds the largest diagonal one (Cauchy-Schwarz)
        top = float(product.diagonal().max()) if product.numel() else 0.0
        if top <= 0.0:
            return  # nothing but zeros: no grid needed
        exponent = math.frexp(top)[1]  # top < 2^exponent
        exponent = -(-exponent // _GRID_STEP) * _GRID_STEP
        count = self.batches.get(exponent, 0) + 1
        if count > _MAX_BATCHES:
            raise ValueError(_too_many(exponent))
        self.batches[exponent] = count
        grid = self.grids.get(exponent)
        if grid is None:
            grid = self.grids[exponent] = torch.zeros_like(product, dtype=torch.int64)
        k = _MANTISSA_BITS - exponent
        for part in _slabs(product.shape[0], product.shape[1]):
            grid[part] += _times_power_of_two(product[part], k).round_().to(torch.int64)

    def total(self, group: Any = None) -> tuple[Tensor, int]:
        """(sum of every added X^T X over the ranks of `group`, as float64; total rows).

        Every rank of `group` must call this: the grids and counts are all-reduced first. The
        grids are released as they are added: call it once, after the last `add`.
        """
        shards = gather_objects((dict(self.batches), self.rows), group)
        exponents = sorted({e for batches, _ in shards for e in batches})
        rows = sum(r for _, r in shards)
        for e in exponents:
            if sum(batches.get(e, 0) for batches, _ in shards) > _MAX_BATCHES:
                raise ValueError(_too_many(e))
        h = torch.zeros(self.columns, self.columns, dtype=torch.float64, device=self.device)
        for e in exponents:  # smallest first: the float64 sum of the grids loses the least
            grid = self.grids.pop(e, None)
            if grid is None:
                grid = torch.zeros_like(h, dtype=torch.int64)
            if group is not None:
                grid = all_reduce(grid, group)
            for r in _slabs(self.columns, self.columns):
                h[r] += _times_power_of_two(grid[r].to(torch.float64), e - _MANTISSA_BITS)
            del grid
        self.grids.clear()
        return h, rows


def _slabs(rows: int, columns: int) -> list[slice]:
    """Row ranges of about `_SLAB` elements covering a [rows, columns] matrix."""
    step = max(1, _SLAB // max(1, columns))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _times_power_of_two(t: Tensor, k: int) -> Tensor:
    """t * 2^k (a new tensor), exact; in two steps where 2^k itself would leave float64."""
    if abs(k) < 1000:
        return t * math.ldexp(1.0, k)
    half = k // 2
    return t * math.ldexp(1.0, half) * math.ldexp(1.0, k - half)


def _too_many(exponent: int) -> str:
    return (
        f"GPTQ's exact Hessian sum holds at most {_MAX_BATCHES} batches of one magnitude "
        f"(2^{exponent}); pass fewer, larger calibration batches"
    )
