"""Checks on what calibration saw, so that no quantizer silently gets a range it cannot use.

`finish_calibration` fixes every calibrated quantizer's scale and zero point. A quantizer that
saw no data (its layer never ran) or only zeros has no range to take a scale from: it stays in
float and a warning names it. (A zero range would otherwise fall back to scale 1.0, which rounds
real inputs to whole numbers: the digits demo calibrated on zeros lost 7.5 points; float is exact
for whatever the layer receives later.)

`SignWatch` follows the plain (uncentred) binary and ternary activation quantizers through the
calibration passes. A binary one whose input never goes below 0 (it follows a ReLU, or takes
[0, 1] pixels) binarizes every value to +1, so its layer's output no longer depends on its input:
a warning names each. When the model's output is then the same for every sample of a batch whose
inputs differ, the model is constant and `quantize` raises instead of returning it. A ternary one
with such an input never uses its -1 level (half its codes): a warning names it. (Per-tensor
binary and ternary activations are centred, `CenteredSign`, and need neither check.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.batches import model_input, tensors_of
from lowbit.exceptions import LowbitWarning
from lowbit.nn.binary_act import CenteredSign
from lowbit.nn.modules import QuantModule
from lowbit.nn.quantizer import TensorQuantizer

__all__ = ["SignWatch", "binary_activation_quantizers", "finish_calibration"]

_SIGN_FIX = (
    "override the layer to None (or to LayerQuant(weight=...) to keep its input float), keep "
    "the first layer in float, or put a centring BatchNorm before it"
)


def finish_calibration(
    model: nn.Module,
    quantizers: list[TensorQuantizer],
    batches: int,
    ranges: Sequence[tuple[Tensor, Tensor] | None] | None = None,
) -> None:
    """Fix the parameters of each quantizer from its calibrator; those that saw no data or only
    zeros are switched off (float) and named in a warning. `ranges`: each quantizer's range
    when already computed (a sharded calibration divides the range searches among ranks)."""
    names = {id(m): n for n, m in model.named_modules()}
    unused, zeros = [], []
    for i, q in enumerate(quantizers):
        assert q.calibrator is not None
        if not q.calibrator.has_data:
            unused.append(names[id(q)])
            q.set_mode("off")
            continue
        known = None if ranges is None else ranges[i]
        # once: the entropy / MSE searches cost
        lo, hi = q.calibrator.compute_range(q.spec) if known is None else known
        if bool((torch.maximum(lo.abs(), hi.abs()) <= torch.finfo(torch.float32).tiny).all()):
            if isinstance(q, CenteredSign):  # a constant input: no sign around its centre
                _warn(
                    f"{names[id(q)]}: every channel of its input held one value throughout "
                    "calibration, so its sign around the channel mean carries nothing; it stays "
                    "in float"
                )
                q.set_mode("off")
                continue
            zeros.append(names[id(q)])
            q.set_mode("off")
            continue
        q.set_range(lo, hi)
    if unused:
        _warn(f"{len(unused)} quantizer(s) saw no calibration data and stay in float: {unused}")
    for name in zeros:
        _warn(
            f"{name} observed only zeros over {batches} calibration batch(es): there is no range "
            "to take a scale from, so it stays in float; calibrate with data that reach this "
            "layer with non-zero values"
        )


class SignWatch:
    """Hooks on a model's binary activation quantizers during calibration: the lowest value each
    saw, and whether the model's output varied across the samples of a batch."""

    def __init__(self, model: nn.Module) -> None:
        self.lowest: dict[str, float] = {}
        self.batches_with_distinct_inputs = 0
        self.output_varied = False
        watched = binary_activation_quantizers(model)
        self.ternary = {name for name, q in watched.items() if q.spec.scheme == "ternary"}
        self.handles = [
            q.register_forward_pre_hook(self._recorder(name)) for name, q in watched.items()
        ]

    def _recorder(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            low = float(args[0].detach().min())
            self.lowest[name] = min(low, self.lowest.get(name, low))

        return record

    def see(self, batch: Any, output: Any) -> None:
        """Record whether `output` differs across the samples of `batch`, when its inputs do."""
        if not self.handles or not _rows_differ(model_input(batch)):
            return
        self.batches_with_distinct_inputs += 1
        self.output_varied = self.output_varied or _rows_differ(output)

    def remove(self) -> None:
        """Take the hooks off (calibration is over; the model must run without them)."""
        for handle in self.handles:
            handle.remove()

    def check(self) -> None:
        """Warn for each quantizer whose input had no sign; raise ValueError if the output was
        constant over samples that differ."""
        signless = [name for name, low in self.lowest.items() if low >= 0.0]
        for name in [n for n in signless if n in self.ternary]:
            _warn(
                f"the {name} never went below 0 during calibration (lowest "
                f"{self.lowest[name]:g}), so its ternary codes are 0 or +1 and the -1 level is "
                "never used; a per-tensor ternary spec centres it per channel "
                "(QuantSpec(bits=2, scheme='ternary'), CenteredSign), or put a centring "
                "BatchNorm before it"
            )
        signless = [n for n in signless if n not in self.ternary]
        for name in signless:
            _warn(
                f"the {name} never went below 0 during calibration (lowest "
                f"{self.lowest[name]:g}), so binarizing it by sign gives +1 everywhere and the "
                f"layer's output does not depend on its input; {_SIGN_FIX}"
            )
        if signless and self.batches_with_distinct_inputs and not self.output_varied:
            raise ValueError(
                "the quantized model's output is the same for every calibration sample: "
                f"{signless} never go below 0, so binarizing by sign turns them into +1 "
                f"whatever the model's input; for each such layer, {_SIGN_FIX}"
            )


def binary_activation_quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """The plain binary (sign) and ternary input and output quantizers of a model's quantized
    layers, by what they quantize ("input of layer 'features.3'")."""
    found = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantModule):
            continue
        for role in ("input", "output"):
            q = getattr(m, f"{role}_quantizer")
            # centred ones (`CenteredSign`) binarize around their channel means
            signs = q is not None and q.spec.scheme in ("binary", "ternary")
            if signs and not isinstance(q, CenteredSign):
                found[f"{role} of layer {name!r}"] = q
    return found


def _rows_differ(obj: Any, rtol: float = 1e-5) -> bool:
    """Whether any tensor in `obj` has samples (rows along dim 0) that differ from its first,
    beyond `rtol` of its largest magnitude (batched kernels may round samples differently)."""
    for t in tensors_of(obj):
        if t.dim() == 0 or t.shape[0] < 2:
            continue
        rows = t.detach().double()
        tolerance = rtol * float(rows.abs().max())
        if bool(((rows - rows[:1]).abs() > tolerance).any()):
            return True
    return False


def _warn(message: str) -> None:
    warnings.warn(message, LowbitWarning, stacklevel=4)
