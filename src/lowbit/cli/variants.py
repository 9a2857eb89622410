"""Quantized variants for the command line: preset names to models, and their measured cost.

`make_variant` turns a preset name (`int8`, `w4a8`, `dynamic`, ...) plus a calibrator into a
quantized model, timing the quantization; `calibrated_variants` makes one per calibrator from a
single calibration pass. `measure` adds accuracy and size, `time_variants` the latency of the
converted models (interleaved rounds) and the kernels they run, so `compare` and `report` build
the same table.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor, nn

from lowbit import presets
from lowbit.calib import FROM_HISTOGRAM, Histogram
from lowbit.cli.data import Batches
from lowbit.config import QuantConfig
from lowbit.evaluate.latency import Latency
from lowbit.spec import PerTensor

DYNAMIC = "dynamic"  # not a config: its own workflow, `quantize_dynamic`
PRESETS = (*presets.NAMES, DYNAMIC)
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
    if calibrator not in FROM_HISTOGRAM:
        raise ValueError(
            f"--calibrator must be one of {', '.join(FROM_HISTOGRAM)}, got {calibrator!r}"
        )
    if name == "dynamic":
        if per_tensor or exclude:
            raise ValueError("--per-tensor and --exclude do not apply to --preset dynamic")
        return None
    config = presets.by_name(name, calibrator)
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
    output_sqnr_db: float | None = None  # of the logits against the float model's
    size_bytes: int = 0
    latency: Latency | None = None
    kernel_counts: dict[tuple[str, str], int] = field(default_factory=dict)  # of the timed model
    histograms: dict[str, Histogram] = field(default_factory=dict)  # by activation quantizer
    runnable: nn.Module | None = field(default=None, repr=False)  # `deployable`'s model

    @property
    def latency_ms(self) -> float | None:
        return None if self.latency is None else self.latency.median_ms

    def speedup(self, float_latency: float | None) -> float | None:
        if self.latency_ms and float_latency:
            return float_latency / self.latency_ms
        return None

    def row(self, float_latency: float | None) -> dict[str, Any]:
        return {
            "variant": self.name,
            "preset": self.preset,
            "calibrator": self.calibrator,
            "top1": self.top1,
            "top5": self.top5,
            "agreement": self.agreement,
            "output_sqnr_db": self.output_sqnr_db,
            "size_kib": self.size_bytes / 1024,
            "latency_ms": self.latency_ms,
            "latency_spread": None if self.latency is None else self.latency.spread,
            "speedup": self.speedup(float_latency),
            "quantize_s": self.quantize_s,
            "kernels": None if self.latency is None else kernel_summary(self.kernel_counts),
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
    from lowbit.workflows.conversion import quantize_dynamic
    from lowbit.workflows.quantization import quantize

    config = preset_config(preset, calibrator, per_tensor=per_tensor, exclude=exclude)
    start = time.perf_counter()
    if config is None:
        qmodel = quantize_dynamic(model)
    else:
        qmodel = quantize(model, config, calib, progress=progress)
    took = time.perf_counter() - start
    name = variant_name(preset, calibrator, per_tensor)
    return Variant(name, qmodel.eval(), preset, calibrator if preset in CALIBRATED else None, took)


def calibrated_variants(
    model: nn.Module,
    preset: str,
    calib: Batches,
    *,
    calibrators: Sequence[str],
    per_tensor: bool = False,
    exclude: Sequence[str] = (),
    progress: bool = True,
) -> list[Variant]:
    """One variant per calibrator from one calibration pass.

    Calibrators observe the same unquantized activations, so one pass with a histogram
    calibrator (the histogram also keeps the exact min and max) serves them all: each variant's
    ranges are computed from those histograms, which every variant keeps in `histograms`.
    Presets without calibrated activations give one variant.
    """
    if preset not in CALIBRATED:
        return [
            make_variant(
                model, preset, calib, per_tensor=per_tensor, exclude=exclude, progress=progress
            )
        ]
    base = make_variant(
        model, preset, calib, calibrator="percentile", per_tensor=per_tensor, exclude=exclude,
        progress=progress,
    )  # fmt: skip
    histograms = input_histograms(base.model)
    variants = []
    for calibrator in calibrators:
        start = time.perf_counter()
        qmodel = recalibrated(base.model, histograms, calibrator)
        took = base.quantize_s + time.perf_counter() - start
        name = variant_name(preset, calibrator, per_tensor)
        variants.append(Variant(name, qmodel, preset, calibrator, took, histograms=histograms))
    return variants


def input_histograms(qmodel: nn.Module) -> dict[str, Histogram]:
    """The histogram each calibrated activation quantizer observed, by qualified name."""
    from lowbit.calib import HistogramCalibrator
    from lowbit.nn.quantizer import TensorQuantizer

    return {
        name: q.calibrator.histogram
        for name, q in qmodel.named_modules()
        if isinstance(q, TensorQuantizer)
        and q.mode != "off"
        and isinstance(q.calibrator, HistogramCalibrator)
        and q.calibrator.has_data
    }


def recalibrated(qmodel: nn.Module, histograms: dict[str, Histogram], calibrator: str) -> nn.Module:
    """A copy of `qmodel` whose quantizers named in `histograms` take `calibrator`'s ranges from
    those histograms: no forward pass."""
    from lowbit.calib import from_histogram
    from lowbit.nn.quantizer import TensorQuantizer

    model = copy.deepcopy(qmodel)
    quantizers = dict(model.named_modules())
    for name, histogram in histograms.items():
        q = quantizers[name]
        assert isinstance(q, TensorQuantizer)
        q.calibrator = from_histogram(calibrator, histogram)
        q.compute_qparams()
    return model


def deployable(variant: Variant) -> nn.Module:
    """The model that runs in PyTorch after quantization: integer modules (`convert`), built
    once per variant."""
    from lowbit.nn.modules import QuantModule
    from lowbit.workflows.conversion import convert

    if variant.runnable is None:
        quantized = any(isinstance(m, QuantModule) for m in variant.model.modules())
        if variant.preset is None or not quantized:
            variant.runnable = variant.model
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                variant.runnable = convert(variant.model)
    return variant.runnable


KERNEL_NAMES = {
    "onednn_qconv": "oneDNN int8",
    "int_mm": "int8 GEMM",
    "int8pack": "int8 weight-only",
    "int4pack": "int4 weight-only",
    "dequantize": "dequantize-then-float",
}


def layer_kernels(model: nn.Module) -> dict[tuple[str, str], int]:
    """How many converted layers of each kind run each kernel: {("conv", "onednn_qconv"): 49}."""
    from lowbit.nn import IntModule

    counts: Counter[tuple[str, str]] = Counter()
    for m in model.modules():
        if isinstance(m, IntModule):
            inner = getattr(m, "module", None)
            fallback = m.kind == "IntFallback" and inner is not None
            kind = type(inner).__name__ if fallback else m.kind.removeprefix("Int").lower()
            counts[kind, m.kernel] += 1
    return dict(counts)


def kernel_summary(counts: dict[tuple[str, str], int]) -> str:
    """e.g. "49 conv oneDNN int8, 1 linear int8 GEMM"; "float" without integer layers."""
    if not counts:
        return "float"
    return ", ".join(
        f"{n} {kind} {KERNEL_NAMES.get(kernel, kernel)}" for (kind, kernel), n in counts.items()
    )


def measure(
    variant: Variant,
    *,
    data: Batches | None,
    calib: Batches,
    float_logits: Sequence[Tensor],
    progress: bool = True,
) -> None:
    """Fill in size, and for the deployable (converted) model: accuracy on labelled `data`,
    top-1 agreement with and output SQNR against the float model's logits on `calib`."""
    from lowbit.evaluate import model_bytes, output_sqnr
    from lowbit.evaluate.accuracy import accuracy, logits, top1_agreement

    variant.size_bytes = model_bytes(variant.model)
    runnable = deployable(variant)
    if data is not None:
        result = accuracy(runnable, data, progress=progress, description=variant.name)
        variant.top1, variant.top5 = result.top1, result.top5
    if variant.preset is not None:
        outputs = logits(runnable, calib)
        variant.agreement = top1_agreement(float_logits, outputs)
        variant.output_sqnr_db = output_sqnr(float_logits, outputs)


def time_variants(variants: Sequence[Variant], example: Tensor) -> None:
    """Latency of every variant's deployable (converted) model, in interleaved rounds after a
    warm-up, and the kernels each runs."""
    from lowbit.evaluate.latency import measure_latencies

    runnable = {str(i): deployable(v) for i, v in enumerate(variants)}
    latencies = measure_latencies(runnable, example)
    for i, v in enumerate(variants):
        v.latency = latencies[str(i)]
        v.kernel_counts = layer_kernels(runnable[str(i)])


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
        """Which variants are not faster than float and why, one line per reason (variants
        within the measurement spread of float share one); one more when timings were noisy."""
        reference = self.variants[0].latency
        if reference is None:
            return []
        by_reason: dict[str, list[Variant]] = {}
        for v in self.variants[1:]:
            if v.latency is not None and v.latency.median_ms >= reference.median_ms:
                by_reason.setdefault(slower_because(v, reference), []).append(v)
        notes = [_ratios(vs, reference) + reason for reason, vs in by_reason.items()]
        noisy = {v.name: v.latency.spread for v in self.variants if v.latency and v.latency.noisy}
        if noisy:
            notes.append(
                f"latency spread up to {max(noisy.values()):.0%} (interquartile range over the "
                f"median) for {', '.join(noisy)}: the machine was busy, so speed-ups are "
                "approximate; measure again on a quiet machine"
            )
        return notes


def _ratios(variants: Sequence[Variant], reference: Latency) -> str:
    """The start of a note: "a, b take 1.01-1.03x float's time"."""
    ratios = [v.latency.median_ms / reference.median_ms for v in variants if v.latency]
    span = f"{min(ratios):.2f}" + (f"-{max(ratios):.2f}" if max(ratios) > min(ratios) else "")
    verb = "takes" if len(variants) == 1 else "take"
    return f"{', '.join(v.name for v in variants)} {verb} {span}x float's time"


def slower_because(variant: Variant, reference: Latency) -> str:
    """Why `variant` is not faster than float, from its timing and its kernels: the end of a
    sentence that starts with its name and time."""
    assert variant.latency is not None
    if variant.latency.overlaps(reference):
        return ", within the spread of the measurements: no measurable difference"
    counts = variant.kernel_counts
    total = sum(counts.values())
    dequantized = sum(n for (_, kernel), n in counts.items() if kernel == "dequantize")
    if total == 0:
        return ": no layer runs an integer kernel, so quantization only adds work"
    if dequantized:
        return (
            f": {dequantized} of {total} layers have no integer kernel for this preset and "
            "dequantize their weights to compute in float"
        )
    return (
        f" though every layer runs an integer kernel ({kernel_summary(counts)}): each "
        "quantizes its float input and returns float, which costs more than int8 saves at one "
        "sample"
    )


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
    """Quantize with every preset (and, for calibrated presets, every calibrator, from one
    calibration pass) and measure the converted models: accuracy on labelled `data`, top-1
    agreement and output SQNR against the float model on the calibration data, and latency,
    all timed together."""
    from lowbit.evaluate.accuracy import logits
    from lowbit.progress import progress_bar

    variants = [Variant("float32", model.eval())]
    for preset in progress_bar(preset_names, "quantizing", enabled=progress):
        variants += calibrated_variants(
            model, preset, calib, calibrators=calibrators, per_tensor=per_tensor,
            exclude=exclude, progress=False,
        )  # fmt: skip
    float_logits = logits(model, calib)
    for v in progress_bar(variants, "evaluating", enabled=progress):
        measure(v, data=data, calib=calib, float_logits=float_logits, progress=False)
    if latency:
        time_variants(variants, calib.example())
    return Comparison(variants)
