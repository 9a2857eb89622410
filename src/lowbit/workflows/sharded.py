"""Calibration over the ranks of a process group: each rank's calib_data is its shard.

After each rank's calibration pass, the ranks check that they run the same model and config
(a digest of every quantizer's name, spec and calibrator), then every calibrator reduces its
state over the group (`Calibrator.sync`), as do the batch count and the sign checks, so
`finish_calibration` computes the same ranges on every rank. A rank without batches takes its
example batch (for BatchNorm folding and tracing) from the first rank that has one
(`lowbit.distributed.example_batch`).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from lowbit.distributed import active_group, check_same, gather_objects, rank, step
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.workflows.calibration_checks import SignWatch

__all__ = ["divided_ranges", "fingerprint", "sync_calibration", "sync_ranges"]


def fingerprint(model: nn.Module, quantizers: list[TensorQuantizer]) -> str:
    """What must match across ranks: each quantizer's name, spec and calibrator, and the shape
    of every parameter and buffer (cheap to compare, and enough to catch another model)."""
    names = {id(m): n for n, m in model.named_modules()}
    lines = [f"{names[id(q)]} {q.spec!r} {_settings(q.calibrator)}" for q in quantizers]
    lines += [f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()]
    return "\n".join(lines)


def _settings(calibrator: Any) -> str:
    """A calibrator's kind and settings (p=, momentum=, ...), not what it observed."""
    settings = {
        k: v
        for k, v in vars(calibrator).items()
        if isinstance(v, int | float | str) and k != "count"
    }
    bins = getattr(getattr(calibrator, "histogram", None), "num_bins", None)
    return f"{type(calibrator).__name__} {sorted(settings.items())} bins={bins}"


def sync_calibration(
    model: nn.Module, quantizers: list[TensorQuantizer], watch: SignWatch, batches: int, group: Any
) -> int:
    """Reduce every calibrator and the sign checks over `group`; the total number of batches."""
    check_same(fingerprint(model, quantizers), group, "the quantized model or its config")
    for q in quantizers:
        assert q.calibrator is not None
        q.calibrator.sync(group)
    seen = gather_objects(
        (batches, watch.lowest, watch.batches_with_distinct_inputs, watch.output_varied), group
    )
    lowest: dict[str, float] = {}
    for _, shard_lowest, _, _ in seen:
        for name, low in shard_lowest.items():
            lowest[name] = min(low, lowest.get(name, low))
    watch.lowest = lowest
    watch.batches_with_distinct_inputs = sum(s[2] for s in seen)
    watch.output_varied = any(s[3] for s in seen)
    return sum(s[0] for s in seen)


def divided_ranges(
    quantizers: list[TensorQuantizer], group: Any
) -> list[tuple[Tensor, Tensor] | None]:
    """Each quantizer's range, the searches (entropy, MSE, percentile) divided among the ranks.

    Call after `sync_calibration`: every rank holds the same statistics, so rank r computes
    the ranges of the quantizers with data whose index is r modulo the world size, and every
    rank takes each range from the rank that computed it. None for a quantizer without data.
    """
    world = dist.get_world_size(group)
    mine: dict[int, tuple[Tensor, Tensor]] = {}
    with step(group, "the range searches"):
        for i, q in enumerate(quantizers):
            assert q.calibrator is not None
            if i % world == rank(group) and q.calibrator.has_data:
                mine[i] = q.calibrator.compute_range(q.spec)
    found = {i: r for shard in gather_objects(mine, group) for i, r in shard.items()}
    return [found.get(i) for i in range(len(quantizers))]


def sync_ranges(model: nn.Module, group: Any = None) -> None:
    """Make the activation ranges a QAT model tracks the same on every rank of `group`.

    Under DistributedDataParallel each rank's quantizers follow a moving average of that rank's
    batches, so the ranges drift apart. Call this before `eval()` / `convert` / export (or every
    few steps): each tracking calibrator becomes the batch-count-weighted mean of the ranks'
    averages, merged in rank order so that every rank gets the same bits, and the scales are
    recomputed from it. The model's other buffers (BatchNorm statistics, which `convert` folds)
    are taken from the group's first rank, as DistributedDataParallel does at each forward.
    Outside a process group it does nothing.
    """
    group = active_group(group)
    if group is None:
        return
    quantizers = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.track]
    check_same(fingerprint(model, quantizers), group, "the QAT model")
    for q in quantizers:
        assert q.calibrator is not None
        q.calibrator.sync(group)
        if q.calibrator.has_data:
            q.compute_qparams()
    source = dist.get_global_rank(group, 0)
    for module in model.modules():
        if not isinstance(module, TensorQuantizer):
            for buffer in module.buffers(recurse=False):
                dist.broadcast(buffer, src=source, group=group)
