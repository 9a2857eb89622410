"""`TensorQuantizer`: the one module that turns a float tensor into its quantized simulation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from lowbit import numerics
from lowbit.calib import Calibrator
from lowbit.spec import PerTensor, QuantSpec

Mode = Literal["calibrate", "quantize", "off"]
_MODES = ("calibrate", "quantize", "off")


class TensorQuantizer(nn.Module):
    """Quantizes one tensor role (a weight, an input, an output) following a `QuantSpec`.

    Where the parameters come from:
    - static (default): a calibrator observes tensors in "calibrate" mode, then
      `compute_qparams()` fixes the scale and zero point (activations in static PTQ);
    - `dynamic=True`: recomputed from every tensor it sees (weights during QAT, activations in
      dynamic quantization, binary and ternary weights);
    - `learnable=True`: the scale is an `nn.Parameter` trained with the LSQ gradient;
    - `track=True` (QAT activations): while the module is training, every tensor updates the
      calibrator (a moving average) and the parameters; in eval they stay fixed.

    Modes: "calibrate" observes and passes the float tensor through; "quantize" returns the
    fake-quantized tensor; "off" passes it through untouched.
    """

    scale: Tensor
    zero_point: Tensor

    def __init__(
        self,
        spec: QuantSpec,
        calibrator: Calibrator | None = None,
        *,
        dynamic: bool = False,
        learnable: bool = False,
        track: bool = False,
    ) -> None:
        super().__init__()
        if spec.scheme in ("binary", "ternary"):
            dynamic = True
        if learnable and (dynamic or spec.scheme != "uniform"):
            raise ValueError("a learnable scale needs a static, uniform quantizer")
        self.spec = spec
        self.calibrator = calibrator
        self.dynamic = dynamic
        self.learnable = learnable
        if track and (calibrator is None or learnable or dynamic):
            raise ValueError("track=True needs a calibrator and a static, non-learnable scale")
        self.track = track
        self.mode: Mode = "quantize" if dynamic or track else "calibrate"
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))

    @property
    def has_qparams(self) -> bool:
        return self.scale.numel() > 0

    def set_mode(self, mode: Mode) -> None:
        if mode not in _MODES:
            raise ValueError(f"TensorQuantizer mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off":
            return x
        if self.mode == "calibrate":
            if self.calibrator is None:
                raise RuntimeError("this quantizer has no calibrator; it cannot calibrate")
            self.calibrator.observe(x.detach())
            return x
        if self.track and self.training:
            self.calibrator.observe(x.detach())  # type: ignore[union-attr]
            self.compute_qparams()
        if self.dynamic:
            scale, zero_point = numerics.tensor_qparams(x, self.spec)
            return numerics.fake_quantize(x, scale, zero_point, self.spec)
        if not self.has_qparams:
            raise RuntimeError(
                "quantizer has no scale yet: calibrate it (or call set_qparams) before quantizing"
            )
        return numerics.fake_quantize(x, self.scale, self.zero_point, self.spec)

    def compute_qparams(self) -> None:
        """Fix scale and zero point from what the calibrator observed, then switch to quantize."""
        if self.calibrator is None:
            raise RuntimeError("this quantizer has no calibrator to compute parameters from")
        self.set_range(*self.calibrator.compute_range(self.spec))

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Fix scale and zero point from a real range [lo, hi], then switch to quantize."""
        self.set_qparams(*numerics.qparams(lo, hi, self.spec))

    def set_qparams_from(self, x: Tensor) -> None:
        """Fix scale and zero point from a tensor itself (a weight)."""
        self.set_qparams(*numerics.tensor_qparams(x, self.spec))

    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        scale = scale.detach().float().clone()
        if self.learnable:
            self._parameters.pop("scale", None)
            self._buffers.pop("scale", None)
            self.scale = nn.Parameter(scale)
        else:
            self.scale = scale
        self.zero_point = zero_point.detach().to(torch.int32).clone()
        self.mode = "quantize"

    def extra_repr(self) -> str:
        s = self.spec
        kind = "binary" if s.scheme == "binary" else f"{s.bits}-bit {s.scheme}"
        sign = ("int" if s.signed else "uint") + ("" if s.symmetric else " affine")
        gran = "" if isinstance(s.granularity, PerTensor) else f", {s.granularity}"
        flags = "".join(
            f", {name}" for name in ("dynamic", "learnable", "track") if getattr(self, name)
        )
        return f"{kind} {sign}{gran}{flags}, mode={self.mode}"


@contextmanager
def switched_off(quantizers: Iterable[TensorQuantizer]) -> Iterator[None]:
    """The quantizers pass values through unchanged meanwhile (a watch pass must not feed
    calibrators); their modes come back afterwards, also on error."""
    quantizers = list(quantizers)
    modes = [q.mode for q in quantizers]
    for q in quantizers:
        q.set_mode("off")
    try:
        yield
    finally:
        for q, mode in zip(quantizers, modes, strict=True):
            q.set_mode(mode)
