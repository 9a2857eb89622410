"""The calibrator interface: observe tensors, then turn what was seen into a range.

State is a dict of plain tensors, and two calibrators of the same kind merge, so calibration can be
sharded across processes (gather the state dicts, `merge` them, compute the range once).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from lowbit.distributed import gather_objects
from lowbit.numerics import check_finite
from lowbit.spec import Granularity, PerChannel, PerGroup, PerTensor, QuantSpec


class Calibrator(ABC):
    """Collects statistics of the tensors it observes and turns them into a quantization range.

    Subclasses implement `_observe`, `_compute_range`, `state_dict`, `load_state_dict` and
    `merge`; this base class validates inputs so that every calibrator fails the same way.
    """

    def __init__(self, *, granularity: Granularity | None = None) -> None:
        granularity = PerTensor() if granularity is None else granularity
        if not isinstance(granularity, PerTensor | PerChannel | PerGroup):
            raise ValueError(
                "granularity must be PerTensor(), PerChannel(axis) or PerGroup(size, axis), "
                f"got {granularity!r}"
            )
        self.granularity: Granularity = granularity

    @property
    def name(self) -> str:
        return type(self).__name__

    def observe(self, x: Tensor) -> None:
        """Add one batch of data. NaN / Inf or an empty tensor raise ValueError."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}.observe expects a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise ValueError(
                f"{self.name}.observe got an empty tensor (shape {tuple(x.shape)}); "
                "calibration needs data"
            )
        check_finite(x, f"{self.name} calibration data")
        self._observe(x.detach().float())

    def compute_range(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        """The (lo, hi) range for `spec`, float32 tensors in the granularity's parameter shape."""
        if spec.granularity != self.granularity:
            raise ValueError(
                f"{self.name} was built for granularity {self.granularity!r} but the spec asks "
                f"for {spec.granularity!r}"
            )
        if not self.has_data:
            raise ValueError(f"{self.name} has observed no data; run calibration first")
        lo, hi = self._compute_range(spec)
        return lo.float(), hi.float()

    @property
    @abstractmethod
    def has_data(self) -> bool:
        """Whether anything has been observed (or loaded / merged in)."""

    @abstractmethod
    def _observe(self, x: Tensor) -> None: ...

    @abstractmethod
    def _compute_range(self, spec: QuantSpec) -> tuple[Tensor, Tensor]: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """Everything observed so far, as plain tensors."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the observed statistics by `state` (from `state_dict`)."""

    @abstractmethod
    def merge(self, other: Calibrator) -> None:
        """Fold in what `other` observed, as if this calibrator had seen its data too."""

    def start_shard(self) -> None:
        """A sharded pass begins: what follows is this rank's part of the data, until `sync`.

        Most calibrators need nothing: their `merge` does not depend on the order of the data.
        """
        return None

    def sync(self, group: Any) -> None:
        """Make this calibrator, on every rank of `group`, hold what all ranks observed.

        Every rank gathers all states and merges them in rank order, so all ranks end with the
        same bits; for MinMax and the histograms that is what one process would have seen.
        """
        if group is None:
            return
        states = gather_objects(self.state_dict(), group)
        shard = copy.deepcopy(self)
        self.load_state_dict(states[0])
        for state in states[1:]:
            shard.load_state_dict(state)
            self.merge(shard)

    def _check_mergeable(self, other: Calibrator) -> None:
        if type(other) is not type(self):
            raise ValueError(f"cannot merge a {other.name} into a {self.name}")
        if other.granularity != self.granularity:
            raise ValueError(
                f"cannot merge calibrators of granularity {other.granularity!r} and "
                f"{self.granularity!r}"
            )


def check_state_keys(name: str, state: dict[str, Tensor], keys: tuple[str, ...]) -> None:
    """ValueError unless `state` holds exactly `keys`, all tensors."""
    if set(state) != set(keys) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{name} state must hold tensors {sorted(keys)}, got {sorted(state)}")


def as_float32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).clone()
