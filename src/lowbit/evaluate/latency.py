"""Wall-clock latency of several models on one input, measured so that their ratios hold.

Each model is first warmed up (compilation, packing, caches), then all are timed in interleaved
rounds, every model once per round in a rotating order, so that a busy moment of the machine
slows every model alike instead of one. The median over rounds is the figure; the interquartile
range over the median is the spread, and a wide spread says the figures are noisy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

Predict = Callable[[Tensor], object]

# Beyond this interquartile range over the median, a ratio of two medians can be off by
# about as much, more than the second digit of the speed-ups printed: say the figures are noisy.
WIDE_SPREAD = 0.2


@dataclass(frozen=True)
class Latency:
    """Milliseconds per call over `runs` rounds: median, quartiles (low, high) and fastest."""

    median_ms: float
    low_ms: float
    high_ms: float
    min_ms: float
    runs: int

    @property
    def spread(self) -> float:
        """Interquartile range over the median (0.1: the middle half of rounds within 10%)."""
        return (self.high_ms - self.low_ms) / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def noisy(self) -> bool:
        """Whether the rounds spread too widely for the median to be trusted."""
        return self.spread > WIDE_SPREAD

    def overlaps(self, other: Latency) -> bool:
        """Whether the middle halves of the two measurements overlap: no clear difference."""
        return self.low_ms <= other.high_ms and other.low_ms <= self.high_ms


def measure_latencies(
    predicts: Mapping[str, Predict],
    example: Tensor,
    *,
    warmup: int = 2,
    rounds: int = 9,
    min_rounds: int = 5,
    max_seconds: float = 10.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Latency]:
    """Time every `predicts[name](example)`: `warmup` untimed calls each, then interleaved rounds.

    Stops after `rounds` rounds, or earlier once `max_seconds` have been spent timing and at
    least `min_rounds` are done, so slow models do not stall a comparison.
    """
    if rounds < 1 or min_rounds < 1 or warmup < 0:
        raise ValueError(
            f"need rounds >= 1, min_rounds >= 1 and warmup >= 0, got rounds={rounds}, "
            f"min_rounds={min_rounds}, warmup={warmup}"
        )
    names = list(predicts)
    if not names:
        raise ValueError("predicts is empty: nothing to time")
    times: dict[str, list[float]] = {name: [] for name in names}
    spent = 0.0
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                predicts[name](example)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = clock()
                predicts[name](example)
                elapsed = clock() - start
                times[name].append(elapsed)
                spent += elapsed
            if spent > max_seconds and r + 1 >= min_rounds:
                break
    return {name: _summary(t) for name, t in times.items()}


def _summary(seconds: list[float]) -> Latency:
    ms = sorted(1e3 * s for s in seconds)
    if len(ms) == 1:
        low = high = ms[0]
    else:
        low, _, high = statistics.quantiles(ms, n=4, method="inclusive")
    return Latency(statistics.median(ms), low, high, ms[0], len(ms))
