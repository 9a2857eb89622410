"""Quantized variants of one model, measured side by side: accuracy, agreement with float, size,
latency and the kernels each runs.

`compare` takes `{name: QuantConfig}` (or a workflow such as `quantize_dynamic` instead of a
config) and returns a `Comparison` whose rows the command line prints and the report shows.
Configs that differ only in a histogram calibrator share one calibration pass: the calibrators
read the same histograms.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from torch import Tensor, nn

from lowbit.calib import FROM_HISTOGRAM, Histogram, HistogramCalibrator, from_histogram
from lowbit.config import QuantConfig
from lowbit.evaluate.accuracy import accuracy, logits, top1_agreement
from lowbit.evaluate.latency import Latency
from lowbit.evaluate.size import model_bytes
from lowbit.evaluate.sqnr import output_sqnr
from lowbit.nn import IntModule
from lowbit.nn.modules import QuantModule
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.progress import progress_bar
from lowbit.workflows.conversion import convert
from lowbit.workflows.quantization import quantize

# A quantization workflow that needs no calibration data, e.g. `quantize_dynamic`.
Workflow = Callable[[nn.Module], nn.Module]


class Batches(Protocol):
    """Re-iterable batches `(inputs, ...)` that know their size and give one example input."""

    @property
    def num_samples(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]: ...

    def example(self) -> Tensor: ...


@dataclass
class Variant:
    """One row of a comparison: a model and what it cost."""

    name: str
    model: nn.Module
    config: QuantConfig | None = None  # None for the float model and for workflows
    calibrator: str | None = None  # the calibrator that set its activation ranges, if any
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
        """How many times faster than `float_latency` (ms); None without both timings."""
        if self.latency_ms and float_latency:
            return float_latency / self.latency_ms
        return None

    def row(self, float_latency: float | None) -> dict[str, Any]:
        """The variant's figures by column key, as the table and `--json` show them."""
        return {
            "variant": self.name,
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


def quantize_variant(
    model: nn.Module,
    name: str,
    how: QuantConfig | Workflow,
    calib: Batches,
    *,
    progress: bool = True,
) -> Variant:
    """`model` quantized with a config (simulated, calibrated on `calib`) or by a workflow,
    timed."""

    start = time.perf_counter()
    if isinstance(how, QuantConfig):
        qmodel = quantize(model, how, calib, progress=progress)
    else:
        qmodel = how(model)
    took = time.perf_counter() - start
    config = how if isinstance(how, QuantConfig) else None
    calibrator = config.calibrator if config is not None and config.calibrated else None
    return Variant(name, qmodel.eval(), config, calibrator, took)


def quantize_variants(
    model: nn.Module,
    configs: Mapping[str, QuantConfig | Workflow],
    calib: Batches,
    *,
    progress: bool = True,
) -> list[Variant]:
    """One variant per entry of `configs`, in their order, each quantized once.

    Configs with calibrated activations that differ only in a histogram calibrator
    (`calib.FROM_HISTOGRAM`, without calibrator_args) share one calibration pass: it records a
    histogram per activation (which also keeps the exact min and max), and each variant's ranges
    are computed from those histograms, which every variant of the group keeps in `histograms`.
    """
    # Jobs: a calibration pass shared by the configs it serves, or one config or workflow alone.
    jobs: list[tuple[QuantConfig | Workflow, dict[str, Any], bool]] = []
    for name, how in configs.items():
        shared = _histogram_pass(how) if isinstance(how, QuantConfig) else None
        job = next((j for j in jobs if j[2] and j[0] == shared), None)
        if job is not None:
            job[1][name] = how
        else:
            jobs.append((how if shared is None else shared, {name: how}, shared is not None))
    made: dict[str, Variant] = {}
    for how, members, is_shared in progress_bar(jobs, "quantizing", enabled=progress):
        if is_shared:
            assert isinstance(how, QuantConfig)
            made.update(_recalibrated_group(model, how, members, calib))
        else:
            (name,) = members
            made[name] = quantize_variant(model, name, how, calib, progress=False)
    return [made[name] for name in configs]


def _histogram_pass(config: QuantConfig) -> QuantConfig | None:
    """The config of the calibration pass that can serve `config` (its own with a histogram
    calibrator), or None where its ranges cannot come from histograms."""
    if not config.calibrated or config.calibrator_args or config.calibrator not in FROM_HISTOGRAM:
        return None
    return replace(config, calibrator="percentile")


def _recalibrated_group(
    model: nn.Module, base_config: QuantConfig, configs: Mapping[str, Any], calib: Batches
) -> dict[str, Variant]:
    """The variants of `configs` (alike but for the calibrator) from one calibration pass with
    `base_config`: each a copy whose ranges come from the pass's histograms, the last one the
    calibrated model itself."""
    base = quantize_variant(model, "base", base_config, calib, progress=False)
    histograms = input_histograms(base.model)
    variants = {}
    for i, (name, config) in enumerate(configs.items()):
        start = time.perf_counter()
        last = i == len(configs) - 1
        qmodel = recalibrated(base.model, histograms, config.calibrator, inplace=last)
        took = base.quantize_s + time.perf_counter() - start
        variants[name] = Variant(
            name, qmodel, config, config.calibrator, took, histograms=histograms
        )
    return variants


def input_histograms(qmodel: nn.Module) -> dict[str, Histogram]:
    """The histogram each calibrated activation quantizer observed, by qualified name."""

    return {
        name: q.calibrator.histogram
        for name, q in qmodel.named_modules()
        if isinstance(q, TensorQuantizer)
        and q.mode != "off"
        and isinstance(q.calibrator, HistogramCalibrator)
        and q.calibrator.has_data
    }


def recalibrated(
    qmodel: nn.Module,
    histograms: dict[str, Histogram],
    calibrator: str,
    *,
    inplace: bool = False,
) -> nn.Module:
    """`qmodel` (a copy unless `inplace`) whose quantizers named in `histograms` take
    `calibrator`'s ranges from those histograms: no forward pass."""

    model = qmodel if inplace else copy.deepcopy(qmodel)
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

    if variant.runnable is None:
        if not any(isinstance(m, QuantModule) for m in variant.model.modules()):
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
    float_logits: Sequence[Tensor] | None,
    progress: bool = True,
) -> None:
    """Fill in size, and for the deployable (converted) model: accuracy on labelled `data` and,
    given the float model's logits on `calib`, top-1 agreement with and output SQNR against
    them."""

    variant.size_bytes = model_bytes(variant.model)
    runnable = deployable(variant)
    if data is not None:
        result = accuracy(runnable, data, progress=progress, description=variant.name)
        variant.top1, variant.top5 = result.top1, result.top5
    if float_logits is not None:
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
    configs: Mapping[str, QuantConfig | Workflow],
    *,
    data: Batches | None = None,
    latency: bool = True,
    progress: bool = True,
) -> Comparison:
    """The float model and a variant per entry of `configs` (see `quantize_variants`),
    measured as converted models: accuracy on labelled `data`, top-1 agreement and output SQNR
    against the float model on the calibration data, and latency, all timed together."""
    from lowbit.evaluate.accuracy import logits

    variants = [Variant("float32", model.eval())]
    variants += quantize_variants(model, configs, calib, progress=progress)
    float_logits = logits(model, calib)
    for i, v in enumerate(progress_bar(variants, "evaluating", enabled=progress)):
        reference = float_logits if i > 0 else None
        measure(v, data=data, calib=calib, float_logits=reference, progress=False)
    if latency:
        time_variants(variants, calib.example())
    return Comparison(variants)
