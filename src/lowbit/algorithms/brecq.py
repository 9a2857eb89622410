"""Block reconstruction: BRECQ (Li et al. 2021) with QDrop (Wei et al. 2022).

AdaRound learns each layer's rounding against that layer's output; at 4 bits the errors of the
layers of a block (a residual block, an MBConv) interact, and matching each layer alone leaves
the block's output off. BRECQ learns the rounding of all the block's weights together
(`_rounding`: the same soft rounding, regulariser and Adam loop as AdaRound) against the float
block's output, ||block_q(x) - block_float(x_float)||^2 (summed over channels, mean over samples and
positions), and learns the step sizes of the block's activation quantizers (LSQ) at the same
time. QDrop: during reconstruction each activation element keeps its float value instead of its
quantized one with probability `qdrop` (the block's input takes the float model's value there),
which makes the learned rounding hold up under the activation noise of later blocks; qdrop=0
is BRECQ.

One pass: the calibration batches are joined into one (`max_samples`) and run through the
quantized model; a hook on each block reconstructs it on the inputs it really receives (every
upstream block already reconstructed: cached once, with the float model's input and output of
the same block from the float model running alongside, `_lockstep`), then the block runs on with
its learned weights. Each step feeds `batch_size` samples; a block stops early once every
rounding has decided. Weight scales start from the per-unit clipping with the least weight error
(`search_weight_scale`), as in both papers.

Write-back as AdaRound: weights become their dequantized learned codes, activation quantizers
keep their learned scales, so export and `lowbit.convert` need nothing new.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.algorithms._act_learning import activation_hook, fused
from lowbit.algorithms._blocks import MAX_BLOCK_LAYERS, find_blocks
from lowbit.algorithms._lockstep import Lockstep, float_copy
from lowbit.algorithms._rounding import (
    RoundingSchedule,
    SoftRounding,
    optimize_rounding,
    rounding_unsupported,
    search_weight_scale,
)
from lowbit.algorithms._sequential import check_qmodel, concat_batches, layer_progress, summary_text
from lowbit.batches import Forward, run_hooked, tensors_of
from lowbit.distributed import active_group
from lowbit.exceptions import LowbitWarning
from lowbit.nn.modules import quant_modules
from lowbit.nn.quantizer import TensorQuantizer

__all__ = ["BlockResult", "BrecqReport", "block_reconstruction"]


@dataclass(frozen=True)
class BlockResult:
    """One block: its output MSE on the calibration samples with nearest rounding (and the
    initial activation scales) and after reconstruction."""

    name: str
    layers: int
    mse_nearest: float
    mse_reconstructed: float
    steps: int
    flipped: float  # fraction of the block's weights whose code differs from nearest
    seconds: float


@dataclass(frozen=True)
class BrecqReport:
    blocks: tuple[BlockResult, ...]
    skipped: tuple[tuple[str, str], ...]
    qdrop: float
    seconds: float
    high_precision: tuple[str, ...] = ()  # layers kept at 8 bits (first / last), if any

    def __str__(self) -> str:
        kind = "BRECQ" if self.qdrop == 0 else f"QDrop (p={self.qdrop:g})"
        head = (
            f"lowbit: {kind} reconstruction of {len(self.blocks)} block(s) in {self.seconds:.0f}s"
        )
        if self.high_precision:
            head += f"; kept at 8 bits: {', '.join(self.high_precision)}"
        rows = [
            f"{b.name} ({b.layers} layers): output MSE {b.mse_nearest:.3g} -> "
            f"{b.mse_reconstructed:.3g} in {b.steps} steps ({100 * b.flipped:.1f}% of codes "
            f"changed, {b.seconds:.1f}s)"
            for b in self.blocks
        ]
        return summary_text(head, rows, self.skipped)


@dataclass(frozen=True)
class _Settings:
    schedule: RoundingSchedule
    qdrop: float
    batch_size: int
    act_lr: float


def block_reconstruction(
    qmodel: nn.Module,
    calib_data: Iterable[Any],
    *,
    qdrop: float = 0.5,
    blocks: Sequence[str] | None = None,
    iterations: int = 500,
    batch_size: int = 16,
    lr: float = 1e-2,
    act_lr: float = 1e-3,
    reg_weight: float = 0.01,
    weight_scales: str = "mse",
    max_samples: int | None = 128,
    seed: int = 0,
    forward: Forward | None = None,
    progress: bool = True,
    group: Any = None,
) -> nn.Module:
    """Reconstruct `qmodel` (from `lowbit.quantize`) block by block, in place; returns it.

    qdrop: probability of keeping an activation element float during reconstruction (0: BRECQ).
    blocks: fnmatch patterns of the block names (default: found from the module tree).
    iterations, batch_size: Adam steps per block (at most) and samples per step.
    lr, act_lr: learning rate of the rounding variables, and of the activation step sizes
        relative to each step size. reg_weight: lambda of the rounding regulariser.
    weight_scales: "mse" (search each unit's clipping first) or "keep" (as calibrated).
    `qmodel.lowbit_brecq` reports each block's output MSE before and after, steps and time.
    """
    check_qmodel(qmodel)
    settings = _settings(qdrop, iterations, batch_size, lr, act_lr, reg_weight, weight_scales)
    found = find_blocks(qmodel, blocks, MAX_BLOCK_LAYERS)
    batch = concat_batches(calib_data, max_samples, active_group(group))
    start = time.perf_counter()
    qmodel.eval()
    skipped = _prepare_weights(qmodel, weight_scales)
    reference = float_copy(qmodel)
    ref_blocks = {n: reference.get_submodule(n) for n in found}
    with (
        layer_progress("BRECQ", len(found), progress) as advance,
        Lockstep(reference, ref_blocks, batch, forward, "BRECQ") as lockstep,
    ):
        run = _Run(settings, _Generators(seed), lockstep, ref_blocks, advance)
        handles = [
            m.register_forward_pre_hook(run.hook(n), with_kwargs=True) for n, m in found.items()
        ]
        run_hooked(qmodel, batch, forward, handles)
    never = [n for n in found if n not in run.seen]
    if never:
        warnings.warn(
            f"BRECQ: {len(never)} block(s) never ran and keep rounding to nearest: {never[:5]}",
            LowbitWarning,
            stacklevel=2,
        )
    skipped += run.skipped + [(n, "did not run on the calibration data") for n in never]
    report = BrecqReport(tuple(run.done), tuple(skipped), qdrop, time.perf_counter() - start)
    qmodel.lowbit_brecq = report  # type: ignore[assignment]
    return qmodel


def _settings(
    qdrop: float,
    iterations: int,
    batch_size: int,
    lr: float,
    act_lr: float,
    reg_weight: float,
    weight_scales: str,
) -> _Settings:
    for name, value in (("iterations", iterations), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(qdrop, int | float) or not 0.0 <= qdrop <= 1.0:
        raise ValueError(f"qdrop must be a probability in [0, 1], got {qdrop!r}")
    for name, rate in (("lr", lr), ("act_lr", act_lr), ("reg_weight", reg_weight)):
        if not isinstance(rate, int | float) or not rate >= 0 or (name == "lr" and rate == 0):
            raise ValueError(
                f"{name} must be {'positive' if name == 'lr' else '>= 0'}, got {rate!r}"
            )
    if weight_scales not in ("mse", "keep"):
        raise ValueError(f"weight_scales must be 'mse' or 'keep', got {weight_scales!r}")
    schedule = RoundingSchedule(iterations, float(lr), float(reg_weight))
    return _Settings(schedule, float(qdrop), batch_size, float(act_lr))


def _prepare_weights(qmodel: nn.Module, weight_scales: str) -> list[tuple[str, str]]:
    """The layers whose rounding cannot be learned, (name, why); the others' weight scales set
    by the clipping search if asked."""
    skipped = []
    for name, qm in quant_modules(qmodel).items():
        why = rounding_unsupported(qm)
        if why is not None:
            if qm.weight_quantizer is not None:
                skipped.append((name, why))
        elif weight_scales == "mse":
            assert qm.weight_quantizer is not None
            search_weight_scale(qm.weight_quantizer, qm.module.weight)
    return skipped


class _Generators:
    """Random numbers of a run: the sample order, and QDrop's masks from their own stream (so
    that a vanishing drop probability reproduces BRECQ exactly)."""

    def __init__(self, seed: int) -> None:
        self.order = torch.Generator().manual_seed(seed)
        self.drop = torch.Generator().manual_seed(seed + 1)


@dataclass
class _Run:
    """The pass over the quantized model: a hook per block reconstructs it."""

    settings: _Settings
    generators: _Generators
    lockstep: Lockstep
    ref_blocks: dict[str, nn.Module]
    advance: Callable[[str], None]
    seen: set[str] = field(default_factory=set)
    done: list[BlockResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def hook(self, name: str) -> Callable[..., None]:
        def pre_hook(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in self.seen:
                self.seen.add(name)
                self.block(name, block, args, kwargs)

        return pre_hook

    def block(self, name: str, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        f_args, f_kwargs = self.lockstep.take(name)
        try:
            if not args or not isinstance(args[0], Tensor) or not isinstance(f_args[0], Tensor):
                raise TypeError("its first input is not a tensor")
            with torch.no_grad():
                target = _output(self.ref_blocks[name](*f_args, **f_kwargs))
            data = _BlockData(args[0], f_args[0], target, args[1:], kwargs)
        except TypeError as error:
            self.skipped.append((name, str(error)))
            return
        finally:
            self.lockstep.release()
        t0 = time.perf_counter()
        result = _reconstruct(name, block, data, self.settings, self.generators)
        if result is None:
            self.skipped.append((name, "no weight or activation to learn"))
            return
        self.done.append(result(time.perf_counter() - t0))
        self.advance(f"{name} ({time.perf_counter() - t0:.0f}s)")


def _output(out: Any) -> Tensor:
    first = next(iter(tensors_of(out)), None)
    if first is None:
        raise TypeError("its output holds no tensor")
    return first


@dataclass
class _BlockData:
    """A block's cached inputs over all samples: the quantized model's `x`, the float model's
    `xf`, the float block's output `target`, and its other arguments."""

    x: Tensor
    xf: Tensor
    target: Tensor
    rest: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self, block: nn.Module, x: Tensor, idx: Tensor | None) -> Tensor:
        if x.dim() == 4:  # PyTorch's CPU backward of 5x5 depthwise convolutions is ~70x faster
            x = x.contiguous(memory_format=torch.channels_last)
        rest = tuple(self._take(a, idx) for a in self.rest)
        kwargs = {k: self._take(v, idx) for k, v in self.kwargs.items()}
        return _output(block(x, *rest, **kwargs))

    def _take(self, value: Any, idx: Tensor | None) -> Any:
        batched = isinstance(value, Tensor) and value.dim() > 0
        if idx is None or not batched or value.shape[0] != self.x.shape[0]:
            return value
        return value[idx]

    def mse(self, block: nn.Module, chunk: int = 32) -> float:
        """The block's output error on every sample (no drop), in the loss's units."""
        total = 0.0
        with torch.no_grad():
            for i in range(0, self.x.shape[0], chunk):
                idx = torch.arange(i, min(i + chunk, self.x.shape[0]))
                out = self.run(block, self.x[idx], idx)
                total += float(_loss(out, self.target[idx])) * len(idx)
        return total / self.x.shape[0]


def _loss(out: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels (dimension 1), mean over samples and positions."""
    d = (out - target).float()
    return (d * d).sum(1).mean() if d.dim() > 1 else (d * d).mean()


def _activation_quantizers(block: nn.Module) -> list[TensorQuantizer]:
    """The block's static uniform activation quantizers (inputs, outputs, op points)."""
    weights = {id(qm.weight_quantizer) for qm in quant_modules(block).values()}
    return [
        q
        for q in block.modules()
        if isinstance(q, TensorQuantizer)
        and id(q) not in weights
        and q.mode == "quantize"
        and q.has_qparams
        and not q.dynamic
        and not q.learnable
        and q.spec.scheme == "uniform"
    ]


def _reconstruct(
    name: str, block: nn.Module, data: _BlockData, settings: _Settings, generators: _Generators
) -> Callable[[float], BlockResult] | None:
    """Learn the block's rounding and activation step sizes; keep them only if the block's
    output error on the calibration samples goes down. Returns the result (given the time)."""
    roundings = [
        SoftRounding(qm) for qm in quant_modules(block).values() if rounding_unsupported(qm) is None
    ]
    acts = _activation_quantizers(block)
    if not roundings and not acts:
        return None
    before = data.mse(block)
    scales = [q.scale.detach().clone() for q in acts]
    with _learning(block, roundings, acts, settings.qdrop, generators.drop) as extra:
        step = _sampler(data, settings.batch_size, settings.qdrop, generators)
        steps = optimize_rounding(
            roundings,
            lambda: _loss(*step(block)),
            settings.schedule,
            [(s, settings.act_lr * float(s.detach().abs().max())) for s in extra],
            lambda: _keep_positive(extra),
        )
    flipped = [r.write(r.learned()) for r in roundings]
    after = data.mse(block)
    if after > before:  # learned nothing useful (too few steps): back to nearest
        for r in roundings:
            r.write(r.nearest())
        for q, s in zip(acts, scales, strict=True):
            q.scale = s
        after, flipped = before, [0.0] * len(roundings)
    weights = [r.w.numel() for r in roundings]
    share = sum(f * n for f, n in zip(flipped, weights, strict=True)) / max(1, sum(weights))
    return lambda seconds: BlockResult(name, len(roundings), before, after, steps, share, seconds)


def _keep_positive(scales: list[Tensor]) -> None:
    with torch.no_grad():
        for s in scales:
            s.clamp_(min=1e-8)


def _sampler(
    data: _BlockData, batch_size: int, qdrop: float, generators: _Generators
) -> Callable[[nn.Module], tuple[Tensor, Tensor]]:
    """A step's (block output, target) on the next `batch_size` samples (a new random order
    each pass); with QDrop the input takes the float model's value with probability `qdrop`."""
    n = data.x.shape[0]
    order: list[Tensor] = []

    def step(block: nn.Module) -> tuple[Tensor, Tensor]:
        if not order:
            order.extend(torch.randperm(n, generator=generators.order).split(batch_size))
        idx = order.pop(0)
        x = data.x[idx]
        if qdrop > 0:
            keep = torch.empty_like(x).uniform_(generator=generators.drop) < qdrop
            x = torch.where(keep, data.xf[idx], x)
        return data.run(block, x, idx), data.target[idx]

    return step


@contextmanager
def _learning(
    block: nn.Module,
    roundings: list[SoftRounding],
    acts: list[TensorQuantizer],
    qdrop: float,
    generator: torch.Generator,
) -> Iterator[list[Tensor]]:
    """Meanwhile the block's weight quantizers return the soft-rounded weights, its activation
    quantizers have learnable scales (yielded) and, with QDrop, pass each element through
    unquantized with probability `qdrop` (`_act_learning`)."""
    switched = [r.quantizer for r in roundings] + [q for q in acts if fused(q)]
    modes = [q.mode for q in switched]
    handles = [r.quantizer.register_forward_hook(_soft_hook(r)) for r in roundings]
    handles += [q.register_forward_hook(activation_hook(qdrop, generator)) for q in acts]
    for q in switched:
        q.set_mode("off")
    for q in acts:
        q.scale = q.scale.detach().clone().requires_grad_(True)
    try:
        yield [q.scale for q in acts]
    finally:
        for h in handles:
            h.remove()
        for q, mode in zip(switched, modes, strict=True):
            q.set_mode(mode)
        for q in acts:
            q.scale = q.scale.detach().clamp(min=1e-8)


def _soft_hook(rounding: SoftRounding) -> Callable[[nn.Module, Any, Tensor], Tensor]:
    def hook(_q: nn.Module, _args: Any, _out: Tensor) -> Tensor:
        return rounding.soft()

    return hook
