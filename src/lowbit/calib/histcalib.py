"""Calibrators that pick a clipping range from a histogram: percentile, entropy (KL) and MSE.

All three share `Histogram`, so their state merges exactly across shards. They are per-tensor
only: a histogram per channel would cost num_bins floats per channel for weights whose exact
min / max is known anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lowbit.calib.base import Calibrator
from lowbit.calib.entropy import entropy_bins
from lowbit.calib.histogram import Histogram
from lowbit.numerics import fake_quantize, qparams
from lowbit.spec import Granularity, PerChannel, PerTensor, QuantSpec


class HistogramCalibrator(Calibrator):
    """Base of the histogram calibrators: observe, state and merge go through one `Histogram`."""

    def __init__(self, num_bins: int = 2048, *, granularity: Granularity | None = None) -> None:
        super().__init__(granularity=granularity)
        if not isinstance(self.granularity, PerTensor):
            raise ValueError(
                f"{self.name} supports only PerTensor() granularity, got {self.granularity!r}; "
                "use MinMax for per-channel or per-group weights"
            )
        self.histogram = Histogram(num_bins)

    @property
    def has_data(self) -> bool:
        return self.histogram.total > 0

    def _observe(self, x: Tensor) -> None:
        self.histogram.observe(x)

    def state_dict(self) -> dict[str, Tensor]:
        return self.histogram.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.histogram.load_state_dict(state)

    def merge(self, other: Calibrator) -> None:
        self._check_mergeable(other)
        assert isinstance(other, HistogramCalibrator)
        self.histogram.merge(other.histogram)

    def sync(self, group: Any) -> None:
        """All-reduce the histogram over `group`: exact, the counts of all ranks' data."""
        self.histogram.all_reduce(group)

    def _symmetric_range(self, threshold: float, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        """(-T, T), or (0, T) for unsigned; (max(min, -T), min(max, T)) for affine specs."""
        h = self.histogram
        threshold = min(threshold, h.absmax)
        if not spec.symmetric:
            lo, hi = max(h.min, -threshold), min(h.max, threshold)
        elif spec.signed:
            lo, hi = -threshold, threshold
        else:
            lo, hi = 0.0, threshold
        return torch.tensor(lo), torch.tensor(hi)


class Percentile(HistogramCalibrator):
    """Clip at the p-th percentile, ignoring the rarest (100 - p)% of values.

    A simple, robust choice for activations with long tails (p = 99.9 to 99.999). Symmetric specs
    use the percentile of |x|; affine specs the (100 - p)-th and p-th percentiles of x.
    """

    def __init__(
        self, p: float = 99.99, num_bins: int = 2048, *, granularity: Granularity | None = None
    ) -> None:
        if not 0.0 < p <= 100.0:
            raise ValueError(f"Percentile p must be in (0, 100], got {p!r}")
        super().__init__(num_bins, granularity=granularity)
        self.p = float(p)

    def _compute_range(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        h = self.histogram
        if spec.symmetric:
            return self._symmetric_range(h.percentile(self.p, absolute=True), spec)
        lo = h.percentile(100.0 - self.p, absolute=False)
        hi = h.percentile(self.p, absolute=False)
        return torch.tensor(lo), torch.tensor(hi)


class Entropy(HistogramCalibrator):
    """TensorRT's entropy calibration: the threshold minimising KL(original || quantized).

    The usual choice for int8 activations of CNNs: it clips long tails where that keeps the shape
    of the distribution. num_quant_bins is the number of quantization levels on one side (128 for
    int8; doubled for unsigned symmetric specs, as TensorRT).
    """

    def __init__(
        self,
        num_bins: int = 2048,
        num_quant_bins: int = 128,
        *,
        granularity: Granularity | None = None,
    ) -> None:
        if not isinstance(num_quant_bins, int) or num_quant_bins < 1:
            raise ValueError(f"num_quant_bins must be a positive int, got {num_quant_bins!r}")
        super().__init__(num_bins, granularity=granularity)
        self.num_quant_bins = num_quant_bins

    def threshold(self, spec: QuantSpec) -> float:
        """T: the upper edge of the KL-optimal last bin of the |x| histogram."""
        levels = self.num_quant_bins * (1 if spec.signed or not spec.symmetric else 2)
        counts = self.histogram.folded().clone()
        # As TensorRT: the zero bin (huge after ReLU) would drown the KL search in one spike.
        counts[0] = counts[1]
        kept = entropy_bins(counts, levels)
        return kept * self.histogram.bin_width

    def _compute_range(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        return self._symmetric_range(self.threshold(spec), spec)


class MSE(HistogramCalibrator):
    """The range minimising the expected squared error (rounding plus clipping) under `spec`.

    Good at low bit widths (4 bits and below), where clipping outliers buys a finer grid. Each
    candidate range shrinks the observed one by k / num_candidates; the error of every histogram
    bin centre is simulated with the library's own qparams and fake-quantize, weighted by counts.
    """

    def __init__(
        self,
        num_candidates: int = 200,
        num_bins: int = 2048,
        *,
        granularity: Granularity | None = None,
    ) -> None:
        if not isinstance(num_candidates, int) or num_candidates < 1:
            raise ValueError(f"num_candidates must be a positive int, got {num_candidates!r}")
        super().__init__(num_bins, granularity=granularity)
        self.num_candidates = num_candidates

    def errors(self, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
        """Candidate ranges (lo, hi) and the expected squared error of each."""
        h = self.histogram
        centres_all = (h.edges()[:-1] + h.edges()[1:]) / 2
        weights = h.counts[h.counts > 0]
        centres = centres_all[h.counts > 0].clamp(h.min, h.max).to(torch.float32)
        fractions = torch.arange(1, self.num_candidates + 1, dtype=torch.float32)
        fractions = fractions / self.num_candidates
        if spec.symmetric:
            top = fractions * h.absmax
            lo = -top if spec.signed else torch.zeros_like(top)
            hi = top
        else:
            lo, hi = fractions * h.min, fractions * h.max
        # One "channel" per candidate: the numerics' own per-channel fake-quantize does the rest.
        grid = spec.with_(granularity=PerChannel(0), rounding="nearest")
        scale, zero_point = qparams(lo, hi, grid)
        x = centres.expand(self.num_candidates, -1)
        with torch.no_grad():
            y = fake_quantize(x, scale, zero_point, grid)
        err = ((y.double() - x.double()) ** 2 * weights).sum(1) / weights.sum()
        return lo, hi, err

    def _compute_range(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        lo, hi, err = self.errors(spec)
        best = int(torch.argmin(err))
        return lo[best].clone(), hi[best].clone()
