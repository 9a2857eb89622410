"""Calibrators: observe tensors, produce a quantization range (lo, hi) for a `QuantSpec`.

    cal = make_calibrator("entropy")
    for batch in data:
        cal.observe(activation(batch))
    lo, hi = cal.compute_range(spec)

State is plain tensors (`state_dict`) and calibrators `merge`, so calibration can be sharded.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.calib.base import Calibrator
from lowbit.calib.histcalib import MSE, Entropy, HistogramCalibrator, Percentile
from lowbit.calib.histogram import Histogram
from lowbit.calib.minmax import MinMax, MovingAverageMinMax
from lowbit.spec import Granularity

CALIBRATORS: dict[str, type[Calibrator]] = {
    "minmax": MinMax,
    "moving_average": MovingAverageMinMax,
    "percentile": Percentile,
    "entropy": Entropy,
    "mse": MSE,
}
# The calibrators `from_histogram` can make: one histogram pass serves them all, so the command
# line and the report offer these.
FROM_HISTOGRAM: tuple[str, ...] = tuple(
    name for name, cls in CALIBRATORS.items() if issubclass(cls, HistogramCalibrator | MinMax)
)


def make_calibrator(name: str, granularity: Granularity | None = None, **kwargs: Any) -> Calibrator:
    """A calibrator by name (a key of `CALIBRATORS`).

    `granularity` defaults to PerTensor(); `kwargs` go to the calibrator (p=, momentum=, ...).
    """
    try:
        cls = CALIBRATORS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown calibrator {name!r}; expected one of {sorted(CALIBRATORS)}"
        ) from None
    return cls(granularity=granularity, **kwargs)


def from_histogram(name: str, histogram: Histogram) -> Calibrator:
    """A per-tensor calibrator by name holding what `histogram` observed: the histogram itself
    for percentile / entropy / mse, its exact min and max for minmax. One histogram pass thus
    serves every calibrator."""
    calibrator = make_calibrator(name)
    if isinstance(calibrator, HistogramCalibrator):
        calibrator.load_state_dict(histogram.state_dict())
    elif isinstance(calibrator, MinMax) and histogram.total > 0:
        calibrator.observe(torch.tensor([histogram.min, histogram.max]))
    else:
        raise ValueError(f"cannot derive a {name!r} calibrator from a histogram")
    return calibrator


__all__ = [
    "CALIBRATORS",
    "FROM_HISTOGRAM",
    "MSE",
    "Calibrator",
    "Entropy",
    "Histogram",
    "HistogramCalibrator",
    "MinMax",
    "MovingAverageMinMax",
    "Percentile",
    "from_histogram",
    "make_calibrator",
]
