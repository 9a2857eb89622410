"""Empirical bias correction (Nagel et al. 2019, section 4.2; AIMET's "empirical" variant).

Quantizing a layer's weights (and inputs) shifts the mean of its outputs: E[W~ x] != E[W x]. The
shift of each output channel, measured on calibration data as E[y_float - y_quant], is added to
the layer's bias (a bias is created where there was none), so each layer's output is unbiased
again. Layers are corrected in execution order and each one is measured with every upstream
correction already in place, so the corrections do not double count.

One forward pass does it: the calibration batches are joined into one (at most `max_samples`
samples), the float model records each layer's per-channel output mean, and a hook on every
quantized layer of the quantized model adds the correction to both its bias and the output it
is producing, so downstream layers see the corrected values in that same pass.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.algorithms._sequential import check_qmodel, concat_batches, layer_progress
from lowbit.batches import Forward, run_batch
from lowbit.nn.modules import QuantModule
from lowbit.transforms.fold_bn import fold_batchnorm

__all__ = ["BiasCorrection", "bias_correction"]

_CORRECTABLE: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


@dataclass(frozen=True)
class BiasCorrection:
    """The mean output shift removed from each layer: largest and mean |shift| over channels."""

    layers: tuple[tuple[str, float, float], ...]
    samples: int

    def __str__(self) -> str:
        lines = [
            f"lowbit: bias correction of {len(self.layers)} layer(s) on {self.samples} samples"
        ]
        for name, top, mean in self.layers:
            lines.append(f"  {name}: |shift| max {top:.3g}, mean {mean:.3g}")
        return "\n".join(lines)


def _channel_axis(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _channel_mean(y: Tensor, axis: int) -> Tensor:
    y = y.detach().double().movedim(axis, 0)
    return y.reshape(y.shape[0], -1).mean(1)


def bias_correction(
    qmodel: nn.Module,
    float_model: nn.Module,
    calib_data: Iterable[Any],
    *,
    max_samples: int | None = 256,
    forward: Forward | None = None,
    progress: bool = True,
) -> nn.Module:
    """Correct the bias of every quantized Linear / Conv layer of `qmodel`, in place.

    float_model: the float model `qmodel` was quantized from (BatchNorm folded here in a copy if
        needed; if CLE was applied before quantizing, pass the equalized model). Its layers must
        have the same qualified names as `qmodel`'s.
    calib_data: calibration batches, joined into one batch of at most `max_samples` samples
        (the mean of each channel is taken over every sample and spatial position).

    Returns `qmodel`; `qmodel.lowbit_bias_correction` lists the shifts removed.
    """
    layers = check_qmodel(qmodel)
    if not isinstance(float_model, nn.Module):
        raise TypeError(f"float_model: expected an nn.Module, got {type(float_model).__name__}")
    if any(isinstance(m, QuantModule) for m in float_model.modules()):
        raise TypeError("float_model has quantized layers: pass the float model")
    targets = {n: m for n, m in layers.items() if isinstance(m.module, _CORRECTABLE)}
    if not targets:
        raise ValueError("qmodel has no quantized Linear or Conv layer to correct")
    given = dict(float_model.named_modules())
    for name, qm in targets.items():
        ref = given.get(name)
        if ref is None or type(ref) is not type(qm.module):
            raise ValueError(
                f"float_model has no layer {name!r} of type {type(qm.module).__name__}: is it "
                "the model that was quantized?"
            )
        if ref.weight.shape != qm.module.weight.shape:
            raise ValueError(f"layer {name!r} has a different weight shape in float_model")

    batch = concat_batches(calib_data, max_samples)
    reference = copy.deepcopy(float_model).eval()
    with torch.no_grad():
        fold_batchnorm(reference, lambda m: run_batch(m, batch, forward))
    ref_modules = dict(reference.named_modules())

    float_means: dict[str, Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, _args: Any, out: Any) -> None:
            if name not in float_means and isinstance(out, Tensor):
                float_means[name] = _channel_mean(out, _channel_axis(module))

        return hook

    handles = [ref_modules[n].register_forward_hook(record(n)) for n in targets]
    try:
        with torch.no_grad():
            run_batch(reference, batch, forward)
    finally:
        for h in handles:
            h.remove()
    del reference

    shifts: list[tuple[str, float, float]] = []
    qmodel.eval()
    with layer_progress("bias correction", len(targets), progress) as advance:

        def correct(name: str):
            def hook(module: nn.Module, _args: Any, out: Any) -> Any:
                if any(n == name for n, _, _ in shifts) or not isinstance(out, Tensor):
                    return None  # a layer that runs twice is corrected at its first call
                if name not in float_means:
                    return None
                axis = _channel_axis(module)
                shift = float_means[name] - _channel_mean(out, axis)
                _add_to_bias(module, shift)
                shifts.append((name, float(shift.abs().max()), float(shift.abs().mean())))
                advance(name)
                view = [1] * out.dim()
                view[axis] = -1
                return out + shift.to(out.dtype).reshape(view)

            return hook

        # Hooks on the float layer inside each QuantModule: its output before any output
        # quantizer, so the quantizer sees the corrected values.
        handles = [qm.module.register_forward_hook(correct(n)) for n, qm in targets.items()]
        try:
            with torch.no_grad():
                run_batch(qmodel, batch, forward)
        finally:
            for h in handles:
                h.remove()
    report = BiasCorrection(tuple(shifts), _count(batch))
    qmodel.lowbit_bias_correction = report  # type: ignore[assignment]
    if progress:
        print(f"lowbit: bias correction of {len(shifts)} layer(s) on {report.samples} samples")
    return qmodel


def _add_to_bias(module: nn.Module, shift: Tensor) -> None:
    weight: Tensor = module.weight  # type: ignore[assignment]
    bias = module.bias
    if isinstance(bias, Tensor):
        bias.add_(shift.to(bias.dtype))
    else:
        module.bias = nn.Parameter(
            shift.to(device=weight.device, dtype=weight.dtype), requires_grad=weight.requires_grad
        )


def _count(batch: Any) -> int:
    from lowbit.batches import tensors_of

    for t in tensors_of(batch):
        if t.dim() > 0:
            return int(t.shape[0])
    return 1
