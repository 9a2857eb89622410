"""`CenteredSign`: the binary (and ternary) activation quantizer that works on real networks.

A plain sign binarizes every ReLU output (and every [0, 1] pixel) to +1, and the model becomes
constant. XNOR-Net (Rastegari et al. 2016) puts a BatchNorm before each sign so that its input is
centred; ReActNet (Liu et al. 2020) learns a threshold per channel (RSign). `CenteredSign` does the
latter for any layer: x becomes c + s * sign(x - c) with a centre c per channel and one scale s
(`numerics.centered_sign`): the two levels c - s and c + s approximate x itself, so a layer whose
input follows a ReLU sees its input's mean and a sign of where each value lies around it.

Ternary activations have the same problem in a milder form: around 0, a ReLU output never takes
the level -1, so one of the three codes is wasted. With a ternary spec `CenteredSign` gives
c + s * t, t in {-1, 0, +1} the nearest of the levels c - s, c, c + s (zero where
|x - c| <= s / 2), with the same centre, calibration and training.

- Calibration (`quantize`, `prepare_qat` with data) sets c to each channel's mean and, from the
  mean |x - c| over the calibration data (`CenterCalibrator`), s: that mean itself for binary
  (XNOR-Net's input scale), twice TWN's threshold 0.7 * mean |x - c| for ternary (so the
  zero band |x - c| <= s / 2 is TWN's).
- QAT learns both (c and s are parameters: straight-through gradients, LSQ's for s), starting
  from the calibration `prepare_qat` runs on its `calib_data` (required).
- A layer whose input is the same value in every position of a channel (a constant input) has
  s = 0: nothing to binarize, so calibration leaves it in float with a warning naming it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit import numerics
from lowbit.calib import Calibrator
from lowbit.calib.base import as_float32, check_state_keys
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.spec import PerTensor, QuantSpec

_KEYS = ("sum", "count", "deviation", "elements")


def channel_axis(x: Tensor, axis: int, dims: int | None) -> int:
    """The channel axis of x: `axis`, one lower for an unbatched input of a layer whose batched
    inputs have `dims` dimensions (a convolution's [C, H, W])."""
    return axis - 1 if dims is not None and axis > 0 and x.dim() == dims - 1 else axis


def _channel_rows(x: Tensor, axis: int) -> Tensor:
    """x as [elements per channel, channels]."""
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


class CenterCalibrator(Calibrator):
    """Per-channel means (the centres) and the mean |x - centre| (the scale) of what it sees.

    The deviation of each batch is taken from the centre as known after that batch, so it is
    exact for one batch and close for many; sums merge across shards.
    """

    def __init__(self, axis: int = -1, dims: int | None = None) -> None:
        super().__init__(granularity=PerTensor())
        self.axis = axis
        self.dims = dims
        self.sum: Tensor | None = None
        self.count = 0
        self.deviation = 0.0
        self.elements = 0

    @property
    def has_data(self) -> bool:
        return self.count > 0

    def _observe(self, x: Tensor) -> None:
        rows = _channel_rows(x.double(), channel_axis(x, self.axis, self.dims))
        total = rows.sum(0)
        if self.sum is not None and self.sum.shape != total.shape:
            raise ValueError(
                f"{self.name}: this batch has {total.numel()} channels on axis {self.axis}, "
                f"earlier batches {self.sum.numel()}"
            )
        self.sum = total if self.sum is None else self.sum + total
        self.count += rows.shape[0]
        self.deviation += float((rows - self.sum / self.count).abs().sum())
        self.elements += rows.numel()

    def center(self) -> Tensor:
        """The per-channel centres observed so far."""
        assert self.sum is not None
        return (self.sum / self.count).float()

    def _compute_range(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        scale = torch.tensor(self.deviation / max(self.elements, 1))
        return -scale, scale

    def state_dict(self) -> dict[str, Tensor]:
        total = self.sum if self.sum is not None else torch.empty(0)
        return {
            "sum": total.clone(),
            "count": torch.tensor(self.count),
            "deviation": torch.tensor(self.deviation, dtype=torch.float64),
            "elements": torch.tensor(self.elements),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        check_state_keys(self.name, state, _KEYS)
        self.count = int(state["count"])
        self.sum = state["sum"].double().clone() if self.count else None
        self.deviation = float(state["deviation"])
        self.elements = int(state["elements"])

    def merge(self, other: Calibrator) -> None:
        self._check_mergeable(other)
        assert isinstance(other, CenterCalibrator)
        if other.sum is None:
            return
        self.sum = other.sum.clone() if self.sum is None else self.sum + other.sum
        self.count += other.count
        self.deviation += other.deviation
        self.elements += other.elements


class CenteredSign(TensorQuantizer):
    """A binary or ternary activation quantizer with a centre per channel along `axis` (1 for a
    convolution's input, -1 for a Linear's) and one scale; see the module docstring.

    learnable=True (QAT): centre and scale are `nn.Parameter`s, set first by calibration.
    """

    center: Tensor

    def __init__(self, spec: QuantSpec, *, axis: int = -1, learnable: bool = False) -> None:
        if spec.scheme not in ("binary", "ternary") or spec.granularity != PerTensor():
            raise ValueError(f"CenteredSign needs a per-tensor binary or ternary spec, got {spec}")
        super().__init__(spec, CenterCalibrator(axis))
        self.dynamic = False  # the scale and the centre are fixed once calibrated (or learned)
        # QAT: no centre until calibration sets one (prepare_qat with calib_data); a training
        # step before that is an error, not a silent float pass
        self.mode = "quantize" if learnable else "calibrate"
        self.axis = axis
        self.dims: int | None = None
        self.center_learnable = learnable
        self.ternary = spec.scheme == "ternary"
        self.register_buffer("center", torch.empty(0))

    def set_axis(self, axis: int, dims: int | None = None) -> None:
        """The channel axis of the tensors it will see (1 for a convolution's, whose batched
        inputs have `dims` dimensions)."""
        self.axis, self.dims = axis, dims
        assert isinstance(self.calibrator, CenterCalibrator)
        self.calibrator.axis, self.calibrator.dims = axis, dims

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off":
            return x
        if self.mode == "calibrate":
            assert self.calibrator is not None
            self.calibrator.observe(x.detach())
            return x
        if not self.has_qparams:
            raise RuntimeError(
                f"a {self.spec.scheme} activation has no centre and scale yet: they start from "
                "calibration (pass calib_data to lowbit.quantize or lowbit.prepare_qat)"
            )
        axis = channel_axis(x, self.axis, self.dims)
        return numerics.centered_sign(x, self.center, self.scale, axis, self.ternary)

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Calibration is over: the centre from the calibrator, the scale from `hi` (the mean
        |x - c|; ternary: twice TWN's threshold on it)."""
        assert isinstance(self.calibrator, CenterCalibrator)
        scale = hi * 2 * numerics.TERNARY_THRESHOLD if self.ternary else hi
        self._set(self.calibrator.center(), scale)

    def _set(self, center: Tensor, scale: Tensor) -> None:
        center = as_float32(center).to(self.center.device)
        scale = as_float32(scale).to(self.center.device).reshape(())
        self._parameters.pop("center", None)
        self._buffers.pop("center", None)
        self._parameters.pop("scale", None)
        self._buffers.pop("scale", None)
        if self.center_learnable:
            self.center = nn.Parameter(center)
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("center", center)
            self.register_buffer("scale", scale)
        self.zero_point = torch.zeros((), dtype=torch.int32, device=center.device)
        self.mode = "quantize"

    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """A scale from outside (a weight-style call) has no centre: refused."""
        raise RuntimeError("CenteredSign takes its centre and scale from calibration or training")

    def extra_repr(self) -> str:
        learn = ", learnable" if self.center_learnable else ""
        return f"{self.spec.scheme} centred per channel (axis {self.axis}){learn}, mode={self.mode}"
