"""Quantized variants for the command line: preset names to models, and their measured cost.

`make_variant` turns a preset name (`int8`, `w4a8`, `dynamic`, ...) plus a calibrator into a
quantized model, timing the quantization. `measure` adds accuracy, size and latency, so `compare`
and `report` build the same table.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

from lowbit import presets
from lowbit.config import QuantConfig
from lowbit.data import Batches
from lowbit.spec import PerTensor

PRESETS = ("int8", "int8-asym", "w8", "w16", "w4", "w4a8", "dynamic", "binary", "ternary")
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
# Presets whose activations are calibrated: only these depend on the calibrator.
CALIBRATED = ("int8", "int8-asym", "w4a8")


def preset_config(
    name: str,
    calibrator: str = "minmax",
    *,
    per_tensor: bool = False,
    exclude: Sequence[str] = (),
) -> QuantConfig | None:
    """The `QuantConfig` of a preset name; None for `dynamic` (its own workflow)."""
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    if calibrator not in CALIBRATORS:
        raise ValueError(
            f"--calibrator must be one of {', '.join(CALIBRATORS)}, got {calibrator!r}"
        )
    makers: dict[str, Callable[[], QuantConfig]] = {
        "int8": lambda: presets.int8(calibrator),
        "int8-asym": lambda: presets.int8_asymmetric(calibrator),
        "w8": lambda: presets.weight_only(8),
        "w16": lambda: presets.weight_only(16),
        "w4": lambda: presets.weight_only(4),
        "w4a8": lambda: presets.w4a8(None, calibrator),
        "binary": presets.binary,
        "ternary": presets.ternary,
    }
    if name == "dynamic":
        if per_tensor or exclude:
            raise ValueError("--per-tensor and --exclude do not apply to --preset dynamic")
        return None
    config = makers[name]()
    if per_tensor and config.weight is not None:
        if config.weight.scheme != "uniform":
            raise ValueError(f"--per-tensor applies to integer presets, not {name}")
        config = replace(config, weight=config.weight.with_(granularity=PerTensor()))
    if exclude:
        config = replace(config, overrides={**config.overrides, **dict.fromkeys(exclude, None)})
    return config


def variant_name(preset: str, calibrator: str, per_tensor: bool = False) -> str:
    name = f"{preset} ({calibrator})" if preset in CALIBRATED else preset
    return f"{name} per-tensor" if per_tensor else name


@dataclass
class Variant:
    """One row of a comparison: a model and what it cost."""

    name: str
    model: nn.Module
    preset: str | None = None  # None for the float model
    calibrator: str | None = None
    quantize_s: float = 0.0
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None  # top-1 agreement with the float model, in percent
    size_bytes: int = 0
    latency_ms: float | None = None

    def row(self, float_latency: float | None) -> dict[str, Any]:
        speedup = None
        if self.latency_ms and float_latency:
            speedup = float_latency / self.latency_ms
        return {
            "variant": self.name,
            "preset": self.preset,
            "calibrator": self.calibrator,
            "top1": self.top1,
            "top5": self.top5,
            "agreement": self.agreement,
            "size_kib": self.size_bytes / 1024,
            "latency_ms": self.latency_ms,
            "speedup": speedup,
            "quantize_s": self.quantize_s,
        }


def make_variant(
    model: nn.Module,
    preset: str,
    calib: Batches,
    *,
    calibrator: str = "minmax",
    per_tensor: bool = False,
    exclude: Sequence[str] = (),
    progress: bool = True,
) -> Variant:
    """Quantize `model` with a preset (simulated; `dynamic` is converted), timing it."""
    from lowbit.api import quantize
    from lowbit.conversion import quantize_dynamic

    config = preset_config(preset, calibrator, per_tensor=per_tensor, exclude=exclude)
    start = time.perf_counter()
    if config is None:
        qmodel = quantize_dynamic(model)
    else:
        qmodel = quantize(model, config, calib, progress=progress)
    took = time.perf_counter() - start
    name = variant_name(preset, calibrator, per_tensor)
    return Variant(name, qmodel.eval(), preset, calibrator if preset in CALIBRATED else None, took)


def deployable(variant: Variant) -> nn.Module:
    """The model that runs in PyTorch after quantization: integer modules (`convert`)."""
    from lowbit.conversion import convert
    from lowbit.nn.modules import QuantModule

    if variant.preset is None or not any(
        isinstance(m, QuantModule) for m in variant.model.modules()
    ):
        return variant.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return convert(variant.model)


def measure(
    variant: Variant,
    *,
    data: Batches | None,
    reference: nn.Module | None,
    agreement_data: Batches | None,
    example: Tensor,
    latency: bool = True,
    progress: bool = True,
) -> None:
    """Fill in accuracy (labelled `data`), agreement with `reference`, size and latency."""
    from lowbit.evaluate import model_bytes
    from lowbit.evaluate.accuracy import accuracy, agreement
    from lowbit.evaluate.latency import measure_latency

    if data is not None:
        result = accuracy(variant.model, data, progress=progress, description=variant.name)
        variant.top1, variant.top5 = result.top1, result.top5
    if reference is not None and agreement_data is not None and variant.preset is not None:
        variant.agreement = agreement(reference, variant.model, agreement_data)
    variant.size_bytes = model_bytes(variant.model)
    if latency:
        runnable = deployable(variant)
        variant.latency_ms = measure_latency(runnable, example).median_ms


@dataclass
class Comparison:
    """The float model and its quantized variants, measured."""

    variants: list[Variant]

    @property
    def float_latency(self) -> float | None:
        return self.variants[0].latency_ms

    def rows(self) -> list[dict[str, Any]]:
        return [v.row(self.float_latency) for v in self.variants]

    def notes(self) -> list[str]:
        """A plain statement naming the variants that are not faster than float, if any."""
        slow = [r for r in self.rows()[1:] if r["speedup"] is not None and r["speedup"] < 1.0]
        if not slow:
            return []
        names = ", ".join(r["variant"] for r in slow)
        worst = 1 / min(r["speedup"] for r in slow)
        verb = "is" if len(slow) == 1 else "are"
        return [
            f"{names} {verb} not faster than float here (up to {worst:.2f}x slower in PyTorch "
            "on this CPU): lowbit's PyTorch layers compute convolutions as dequantize-then-float "
            "and simulate activation quantization, which adds work. For int8 speed, export to "
            "ONNX (-o model.onnx) and run it in ONNX Runtime, OpenVINO or TensorRT."
        ]


def compare(
    model: nn.Module,
    calib: Batches,
    *,
    data: Batches | None,
    preset_names: Sequence[str],
    calibrators: Sequence[str],
    per_tensor: bool = False,
    exclude: Sequence[str] = (),
    latency: bool = True,
    progress: bool = True,
) -> Comparison:
    """Quantize with every preset (and, for calibrated presets, every calibrator) and measure.

    Without labelled `data`, accuracy is replaced by top-1 agreement with the float model on
    the calibration data.
    """
    example = calib.example()
    agreement_data = None if data is not None else calib
    from lowbit.progress import progress_bar

    jobs = [
        (preset, calibrator)
        for preset in preset_names
        for calibrator in (calibrators if preset in CALIBRATED else calibrators[:1])
    ]
    variants = [Variant("float32", model.eval())]
    for preset, calibrator in progress_bar(jobs, "quantizing", enabled=progress):
        variants.append(
            make_variant(
                model,
                preset,
                calib,
                calibrator=calibrator,
                per_tensor=per_tensor,
                exclude=exclude,
                progress=False,
            )
        )
    for v in progress_bar(variants, "evaluating", enabled=progress):
        measure(
            v,
            data=data,
            reference=model,
            agreement_data=agreement_data,
            example=example,
            latency=latency,
            progress=False,
        )
    return Comparison(variants)
