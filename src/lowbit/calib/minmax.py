"""Range calibrators that keep only a min and a max per scale unit."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lowbit.calib.base import Calibrator, as_float32, check_state_keys
from lowbit.distributed import gather_objects
from lowbit.numerics import tensor_range
from lowbit.spec import Granularity, QuantSpec

_KEYS = ("min", "max", "count")


class _RangeCalibrator(Calibrator):
    """Shared state of MinMax and MovingAverageMinMax: min, max (parameter shape), batch count."""

    def __init__(self, *, granularity: Granularity | None = None) -> None:
        super().__init__(granularity=granularity)
        self.min: Tensor | None = None
        self.max: Tensor | None = None
        self.count = 0

    @property
    def has_data(self) -> bool:
        return self.count > 0

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = tensor_range(x, self.granularity)
        if self.min is not None and lo.shape != self.min.shape:
            raise ValueError(
                f"{self.name}: this batch gives ranges of shape {tuple(lo.shape)} for "
                f"{self.granularity!r}, earlier batches gave {tuple(self.min.shape)}"
            )
        return lo, hi

    def _compute_range(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        assert self.min is not None and self.max is not None
        return self.min.clone(), self.max.clone()

    def state_dict(self) -> dict[str, Tensor]:
        if self.min is None or self.max is None:
            return {"min": torch.empty(0), "max": torch.empty(0), "count": torch.tensor(0)}
        return {"min": self.min.clone(), "max": self.max.clone(), "count": torch.tensor(self.count)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        check_state_keys(self.name, state, _KEYS)
        count = int(state["count"])
        if count < 0:
            raise ValueError(f"{self.name} state count must be >= 0, got {count}")
        if count == 0:
            self.min, self.max, self.count = None, None, 0
            return
        if state["min"].shape != state["max"].shape:
            raise ValueError(f"{self.name} state min and max differ in shape")
        self.min, self.max = as_float32(state["min"]), as_float32(state["max"])
        self.count = count

    def _other_state(self, other: Calibrator) -> tuple[Tensor, Tensor, int] | None:
        self._check_mergeable(other)
        assert isinstance(other, _RangeCalibrator)
        if other.min is None or other.max is None:
            return None
        if self.min is not None and self.min.shape != other.min.shape:
            raise ValueError(
                f"cannot merge {self.name} ranges of shapes {tuple(self.min.shape)} and "
                f"{tuple(other.min.shape)}"
            )
        return other.min, other.max, other.count


class MinMax(_RangeCalibrator):
    """The exact min and max of everything observed, per scale unit.

    Use it for weights (any granularity: per-tensor, per-channel, per-group) and for activations
    when outliers are rare; one outlier widens the range and costs resolution everywhere else.
    """

    def _observe(self, x: Tensor) -> None:
        self._widen(*self._batch_range(x), 1)

    def merge(self, other: Calibrator) -> None:
        theirs = self._other_state(other)
        if theirs is not None:
            lo, hi, count = theirs
            self._widen(lo.clone(), hi.clone(), count)

    def _widen(self, lo: Tensor, hi: Tensor, count: int) -> None:
        """Take the union of the range so far and [lo, hi], seen over `count` batches."""
        if self.min is None or self.max is None:
            self.min, self.max = lo, hi
        else:
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
        self.count += count


class MovingAverageMinMax(_RangeCalibrator):
    """An exponential moving average of each batch's min and max (as PyTorch's observer).

    Use it for activations calibrated on many batches, or tracked during QAT, where a single
    extreme batch should not set the range: running = momentum * running + (1 - momentum) * batch.

    Over several processes the average depends on the order of the batches. In a sharded pass
    (`start_shard` ... `sync`) each rank keeps its batches' ranges, and `sync` replays all of
    them in rank order (rank 0's batches first), so the result is that of one process observing
    the shards one after the other. Without `start_shard`, `sync` (and `merge`) take the
    batch-count-weighted mean of the ranks' averages.
    """

    def __init__(self, momentum: float = 0.9, *, granularity: Granularity | None = None) -> None:
        super().__init__(granularity=granularity)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"MovingAverageMinMax momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self._shard: tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]]] | None = None

    def start_shard(self) -> None:
        """Keep each batch's range from now on, so that `sync` can replay them in order."""
        self._shard = (self.state_dict(), [])

    def sync(self, group: Any) -> None:
        """Replay every rank's batches of the sharded pass in rank order (or, without
        `start_shard`, average the ranks' averages, weighted by their batch counts)."""
        if self._shard is None:
            super().sync(group)
            return
        start, ranges = self._shard
        self._shard = None
        if group is None:
            return
        gathered = gather_objects(ranges, group)
        self.load_state_dict(start)
        for lo, hi in (pair for shard in gathered for pair in shard):
            self._update(lo, hi)

    def _observe(self, x: Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self._shard is not None:
            self._shard[1].append((lo, hi))
        self._update(lo, hi)

    def _update(self, lo: Tensor, hi: Tensor) -> None:
        if self.min is None or self.max is None:
            self.min, self.max = lo, hi
        else:
            m = self.momentum
            self.min = m * self.min + (1.0 - m) * lo
            self.max = m * self.max + (1.0 - m) * hi
        self.count += 1

    def merge(self, other: Calibrator) -> None:
        """Average the two running ranges, weighted by how many batches each has seen."""
        theirs = self._other_state(other)
        if theirs is None:
            return
        lo, hi, count = theirs
        if self.min is None or self.max is None:
            self.min, self.max, self.count = lo.clone(), hi.clone(), count
            return
        total = self.count + count
        self.min = (self.count * self.min + count * lo) / total
        self.max = (self.count * self.max + count * hi) / total
        self.count = total
