"""Wall-clock latency of a model on one input: warm-up, then the median of timed runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Latency:
    """Milliseconds per call: median and fastest of `runs` timed calls."""

    median_ms: float
    min_ms: float
    runs: int


def measure_latency(
    predict: Callable[[Tensor], object],
    example: Tensor,
    *,
    warmup: int = 2,
    runs: int = 20,
    max_seconds: float = 1.0,
) -> Latency:
    """Time `predict(example)`: `warmup` untimed calls, then up to `runs` timed ones.

    Stops early once `max_seconds` have been spent timing (at least 3 runs), so a slow model
    does not stall a comparison.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    times: list[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            predict(example)
        spent = 0.0
        for _ in range(runs):
            start = time.perf_counter()
            predict(example)
            elapsed = time.perf_counter() - start
            times.append(elapsed)
            spent += elapsed
            if spent > max_seconds and len(times) >= 3:
                break
    return Latency(1e3 * statistics.median(times), 1e3 * min(times), len(times))
