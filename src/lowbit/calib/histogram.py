"""One mergeable histogram that serves the percentile, entropy and MSE calibrators.

The histogram is signed, over [-R, R] in 2 * num_bins equal bins, with R = 2^exponent always a
power of two. Folding |x| then gives exactly num_bins bins over [0, R]. When data exceed R, R
doubles k times and each new bin is the exact sum of the old bins it covers, so observing in any
order, or merging shards, gives the same counts as one pass over all the data.

Bin index of a float32 x: floor(x * num_bins * 2^-exponent) + num_bins. For num_bins < 2^29 every
step is exact in float64, so the binning does not depend on which R was current.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lowbit.distributed import all_reduce
from lowbit.numerics import tensor_range
from lowbit.spec import PerTensor

# All-zero data still need a range: R never goes below 2^-126 (the smallest normal float32).
MIN_EXPONENT = -126
_KEYS = ("counts", "exponent", "min", "max")


class Histogram:
    """Counts (float64) of observed values over [-2^exponent, 2^exponent], plus exact min / max."""

    def __init__(self, num_bins: int = 2048) -> None:
        if not isinstance(num_bins, int) or isinstance(num_bins, bool) or not 1 <= num_bins < 2**29:
            raise ValueError(f"num_bins must be an int in [1, 2^29), got {num_bins!r}")
        self.num_bins = num_bins
        self.counts = torch.zeros(2 * num_bins, dtype=torch.float64)
        self.exponent = MIN_EXPONENT
        self.min = math.inf
        self.max = -math.inf

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    @property
    def range(self) -> float:
        """R: the histogram covers [-R, R]."""
        return math.ldexp(1.0, self.exponent)

    @property
    def bin_width(self) -> float:
        return self.range / self.num_bins

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    def edges(self) -> Tensor:
        """The 2 * num_bins + 1 edges of the signed histogram (float64)."""
        return torch.linspace(-self.range, self.range, 2 * self.num_bins + 1, dtype=torch.float64)

    def folded(self) -> Tensor:
        """Counts of |x| over [0, R]: num_bins bins (a value -0.0 <= x < w lands in bin 0)."""
        n = self.num_bins
        return self.counts[n:] + self.counts[:n].flip(0)

    def observe(self, x: Tensor) -> None:
        """Add the values of `x` (finite, non-empty; checked by the caller's tensor_range)."""
        lo_t, hi_t = tensor_range(x, PerTensor())
        lo, hi = float(lo_t), float(hi_t)
        absmax = max(abs(lo), abs(hi))
        if absmax > 0.0:
            self._widen(max(MIN_EXPONENT, _ceil_log2(absmax)))
        n = self.num_bins
        index = bin_indices(x.detach().reshape(-1).to(torch.float32), n, self.exponent)
        if hi >= self.range:
            index = index.clamp_(max=2 * n - 1)  # x == R lands in the last bin
        self.counts += torch.bincount(index, minlength=2 * n).to(torch.float64)
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)

    def _widen(self, exponent: int) -> None:
        """Grow R to 2^exponent (if larger), summing the old bins into the new ones exactly."""
        k = exponent - self.exponent
        if k <= 0:
            return
        self.exponent = exponent
        if self.total == 0.0:
            return
        n = self.num_bins
        # Offset coordinates: old bin b spans [b, b + 1); new bins are 2^k wide and start at
        # -(2^k - 1) * n. Beyond 2^k >= n every negative bin maps to n - 1 and every other to n.
        step = 2 ** min(k, max(1, math.ceil(math.log2(n))))
        old = torch.arange(2 * n, dtype=torch.int64)
        new_index = torch.div(old + (step - 1) * n, step, rounding_mode="floor")
        widened = torch.zeros_like(self.counts)
        widened.index_add_(0, new_index, self.counts)
        self.counts = widened

    def merge(self, other: Histogram) -> None:
        """Add `other`'s counts: exact, whatever the two ranges were."""
        if other.num_bins != self.num_bins:
            raise ValueError(
                f"cannot merge histograms of {other.num_bins} and {self.num_bins} bins"
            )
        if other.total == 0.0:
            return
        theirs = Histogram(other.num_bins)
        theirs.load_state_dict(other.state_dict())
        exponent = max(self.exponent, theirs.exponent)
        self._widen(exponent)
        theirs._widen(exponent)
        self.counts = self.counts + theirs.counts
        self.min = min(self.min, theirs.min)
        self.max = max(self.max, theirs.max)

    def all_reduce(self, group: Any) -> None:
        """Sum the histograms of every rank of `group` into this one, on every rank.

        The ranges are first brought to the largest one (bins summed exactly, as in `merge`),
        then the counts summed: integers in float64, so the order of the sum does not matter
        and the result is that of one pass over all ranks' data.
        """
        if group is None:
            return
        largest = dist.ReduceOp.MAX
        exponent = all_reduce(torch.tensor([self.exponent], dtype=torch.int64), group, largest)
        self._widen(int(exponent))
        self.counts = all_reduce(self.counts, group)
        bounds = torch.tensor([-self.min, self.max], dtype=torch.float64)
        bounds = all_reduce(bounds, group, largest)
        self.min, self.max = -float(bounds[0]), float(bounds[1])

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "counts": self.counts.clone(),
            "exponent": torch.tensor(self.exponent, dtype=torch.int64),
            "min": torch.tensor(self.min, dtype=torch.float64),
            "max": torch.tensor(self.max, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(_KEYS):
            raise ValueError(f"histogram state must hold {sorted(_KEYS)}, got {sorted(state)}")
        counts = state["counts"]
        if counts.shape != (2 * self.num_bins,):
            raise ValueError(
                f"histogram state has {counts.numel()} counts; expected {2 * self.num_bins} "
                f"(2 * num_bins for num_bins={self.num_bins})"
            )
        self.counts = counts.detach().to(torch.float64).clone()
        self.exponent = int(state["exponent"])
        self.min = float(state["min"])
        self.max = float(state["max"])

    def percentile(self, q: float, *, absolute: bool) -> float:
        """The q-th percentile (0..100) of x (or |x|), interpolating linearly within a bin."""
        counts = self.folded() if absolute else self.counts
        start = 0.0 if absolute else -self.range
        cdf = torch.cumsum(counts, 0)
        target = q / 100.0 * float(cdf[-1])
        k = int(torch.argmax(((cdf >= target) & (counts > 0)).to(torch.int8)))
        before = float(cdf[k - 1]) if k > 0 else 0.0
        fraction = min(max((target - before) / float(counts[k]), 0.0), 1.0)
        value = start + (k + fraction) * self.bin_width
        lo, hi = (0.0, self.absmax) if absolute else (self.min, self.max)
        return min(max(value, lo), hi)


def bin_indices(values: Tensor, num_bins: int, exponent: int) -> Tensor:
    """floor(x * num_bins * 2^-exponent) + num_bins for float32 values |x| <= 2^exponent, exactly.

    In float64 the product is exact (24 bits times fewer than 29). With num_bins = 2^b and
    exponent <= b, float32 is exact too and four times cheaper (calibration spends most of its
    time here): the scale 2^(b - exponent) is a power of two of at least 1 (and below 2^128), so
    the product neither rounds nor underflows, and |product| <= 2^b. Other cases take float64.
    """
    bits = num_bins.bit_length() - 1
    if num_bins == 1 << bits and 0 <= bits - exponent < 128:
        scaled = values * math.ldexp(1.0, bits - exponent)
        return scaled.floor_().to(torch.int32).add_(num_bins)
    scaled = values.to(torch.float64) * (num_bins * math.ldexp(1.0, -exponent))
    return scaled.floor_().to(torch.int64).add_(num_bins)


def _ceil_log2(v: float) -> int:
    """ceil(log2(v)) for v > 0, exactly (v = m * 2^e with 0.5 <= m < 1)."""
    mantissa, exponent = math.frexp(v)
    return exponent - 1 if mantissa == 0.5 else exponent
