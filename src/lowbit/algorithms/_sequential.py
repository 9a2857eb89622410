"""Private helpers of the algorithms: the checks of their model argument, the text of their
reports, and what the layer-by-layer CNN algorithms (bias correction, AdaRound) share.

Those two run the quantized model once over the calibration set, concatenated into one batch, and do
their work for each layer inside a hook on that layer: every layer then sees inputs that already
include the corrections made upstream, exactly as the final model will, in one forward pass
instead of one pass per layer. Memory is that of one forward pass over at most `max_samples`
samples, plus one layer's sampled input rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit import numerics
from lowbit.batches import check_batch, first_batch, tensors_of
from lowbit.distributed import gather_shards
from lowbit.nn.modules import QuantModule, quant_modules
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.progress import stderr_console
from lowbit.spec import Granularity, PerGroup
from lowbit.transforms.trace import Value, trace

__all__ = [
    "ConvCall",
    "check_float_model",
    "check_qmodel",
    "concat_batches",
    "conv_call",
    "full_param",
    "layer_progress",
    "pick_rows",
    "rows_at",
    "summary_text",
]


def check_float_model(model: nn.Module, algorithm: str) -> None:
    """Reject anything but a float model: algorithms that rewrite weights run before quantize."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if quant_modules(model):
        raise TypeError(
            f"model: {algorithm} works on the float model, before lowbit.quantize; this model "
            "already has quantized layers"
        )


def summary_text(head: str, rows: Iterable[str], skipped: Iterable[tuple[str, str]]) -> str:
    """A report's `str()`: its head line, one indented line per row, then what was skipped."""
    lines = [head, *(f"  {row}" for row in rows)]
    lines += [f"  skipped {what}: {why}" for what, why in skipped]
    return "\n".join(lines)


def check_qmodel(qmodel: nn.Module, what: str = "qmodel") -> dict[str, QuantModule]:
    """The model's QuantModules by name; clear errors for a float or uncalibrated model."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"{what}: expected an nn.Module, got {type(qmodel).__name__}")
    layers = quant_modules(qmodel)
    if not layers:
        raise ValueError(
            f"{what} has no quantized layers: pass the model that lowbit.quantize returned"
        )
    for name, m in qmodel.named_modules():
        if isinstance(m, TensorQuantizer) and m.mode == "calibrate":
            raise ValueError(
                f"{what}: quantizer {name} is still calibrating; run lowbit.calibrate (or "
                "lowbit.quantize) first"
            )
    return layers


def concat_batches(calib_data: Iterable[Any], max_samples: int | None, group: Any = None) -> Any:
    """The calibration batches joined along dimension 0 into one, at most `max_samples` long.

    Tensors (and the tensors of tuples, lists and dicts) are concatenated; other items are
    taken from the first batch. In a process group every rank's joined shard is gathered and
    joined again in rank order, so every rank gets the batch one process would get from the
    shards one after the other (a rank without batches adds none).
    """
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if group is not None:
        join = partial(concat_batches, calib_data, max_samples)
        shards = gather_shards(calib_data, group, "joining the calibration batches", join)
        if not shards:
            raise ValueError("calib_data is empty on every rank: calibration needs a batch")
        return concat_batches(shards, max_samples)
    first_batch(calib_data)
    parts: list[Any] = []
    n = 0
    for batch in calib_data:
        check_batch(batch)
        size = _batch_size(batch)
        if max_samples is not None and n + size > max_samples:
            batch = _slice(batch, max_samples - n)
            size = max_samples - n
        parts.append(batch)
        n += size
        if max_samples is not None and n >= max_samples:
            break
    return parts[0] if len(parts) == 1 else _join(parts)


def _batch_size(batch: Any) -> int:
    for t in tensors_of(batch):
        if t.dim() > 0:
            return int(t.shape[0])
    raise TypeError("a calibration batch holds no tensor with a batch dimension")


def _slice(batch: Any, n: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[:n] if batch.dim() > 0 else batch
    if isinstance(batch, tuple | list):
        return type(batch)(_slice(b, n) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _slice(v, n) for k, v in batch.items()}
    return batch


def _join(parts: list[Any]) -> Any:
    head = parts[0]
    if isinstance(head, Tensor):
        if head.dim() == 0:
            return head
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise ValueError(
                "calibration batches must have the same shape apart from the batch size to be "
                f"joined; got {sorted(shapes)}"
            )
        return torch.cat(parts)
    if isinstance(head, tuple | list):
        return type(head)(_join([p[i] for p in parts]) for i in range(len(head)))
    if isinstance(head, Mapping):
        return {k: _join([p[k] for p in parts]) for k in head}
    return head


# ---------------------------------------------------------------------------------------------
# What a layer's convolution actually computes


@dataclass
class ConvCall:
    """The input and arguments of the F.conv1d / F.conv2d / F.linear call inside a layer.

    `input` is already padded (zero padding applied), so patches can be read off directly.
    """

    input: Tensor
    kind: str  # "linear" | "conv"
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


_CONV_FUNCS = {"conv1d": 1, "conv2d": 2, "linear": 0}
_TRACED = {*_CONV_FUNCS, "conv3d", "conv_transpose1d", "conv_transpose2d"}


def _pair(v: Any, dims: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * dims
    return tuple(int(x) for x in v)


def conv_call(module: nn.Module, x: Tensor) -> ConvCall:
    """Run `module(x)` and record its one convolution or linear call.

    Works for subclasses with their own forward (EfficientNet pads, then calls F.conv2d).
    Raises TypeError for layers this cannot describe (3-d or transposed convolutions, several
    calls, non-zero padding modes handled inside the call).
    """
    seen = trace(module, lambda m: m(x), keep_tensors=True)
    calls = [c for c in seen.calls if c.module is None and c.op in _TRACED]
    kind = type(module).__name__
    if len(calls) != 1 or calls[0].op not in _CONV_FUNCS:
        found = [c.op for c in calls]
        raise TypeError(
            f"{kind}: expected one conv1d, conv2d or linear call in its forward, found {found}"
        )
    name, args, kwargs = calls[0].op, calls[0].args, calls[0].kwargs
    inp: Tensor = seen.tensors[args[0].id]
    weight: Value = args[1] if len(args) > 1 else kwargs["weight"]
    if name == "linear":
        return ConvCall(inp.reshape(-1, inp.shape[-1]), "linear", (1, 1), (1, 1), (1, 1), 1)
    dims = _CONV_FUNCS[name]
    names = ("stride", "padding", "dilation", "groups")
    defaults: tuple[Any, ...] = (1, 0, 1, 1)
    values = [
        args[3 + i] if len(args) > 3 + i else kwargs.get(n, d)
        for i, (n, d) in enumerate(zip(names, defaults, strict=True))
    ]
    stride, padding, dilation = (_pair(values[0], dims), values[1], _pair(values[2], dims))
    groups = int(values[3])
    kernel = tuple(weight.shape[2:])
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0,) * (2 * dims)
        else:  # "same": stride 1 only, extra padding on the right as PyTorch does
            totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
            pad = tuple(v for t in reversed(totals) for v in (t // 2, t - t // 2))
    else:
        p = _pair(padding, dims)
        pad = tuple(v for q in reversed(p) for v in (q, q))
    if any(pad):
        inp = F.pad(inp, pad)
    if dims == 1:
        inp = inp.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    return ConvCall(
        inp,
        "conv",
        (kernel[0], kernel[1]),
        (stride[0], stride[1]),
        (dilation[0], dilation[1]),
        groups,
    )


def output_positions(call: ConvCall) -> int:
    if call.kind == "linear":
        return int(call.input.shape[0])
    n, _, h, w = call.input.shape
    ho = (h - call.dilation[0] * (call.kernel[0] - 1) - 1) // call.stride[0] + 1
    wo = (w - call.dilation[1] * (call.kernel[1] - 1) - 1) // call.stride[1] + 1
    return int(n * ho * wo)


def pick_rows(call: ConvCall, rows: int, generator: torch.Generator) -> Tensor:
    """Up to `rows` output positions (flat over images and positions), drawn uniformly."""
    total = output_positions(call)
    if total <= rows:
        return torch.arange(total)
    return torch.randperm(total, generator=generator)[:rows]


def rows_at(call: ConvCall, pick: Tensor) -> Tensor:
    """The input patches at output positions `pick`, as [rows, groups, in_channels / groups *
    kernel elements] (the weight's layout)."""
    if call.kind == "linear":
        return call.input[pick].unsqueeze(1).float()
    xp = call.input
    _, _, h, w = xp.shape
    (kh, kw), (sh, sw), (dh, dw) = call.kernel, call.stride, call.dilation
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (w - dw * (kw - 1) - 1) // sw + 1
    img, pos = pick // (ho * wo), pick % (ho * wo)
    oi, oj = pos // wo, pos % wo
    hh = oi[:, None] * sh + torch.arange(kh)[None, :] * dh  # [R, kh]
    ww = oj[:, None] * sw + torch.arange(kw)[None, :] * dw  # [R, kw]
    patches = xp[img[:, None, None], :, hh[:, :, None], ww[:, None, :]]  # [R, kh, kw, C]
    patches = patches.permute(0, 3, 1, 2)  # [R, C, kh, kw]: the weight's [in, kh, kw] order
    return patches.reshape(len(pick), call.groups, -1).float()


def full_param(p: Tensor, weight: Tensor, granularity: Granularity) -> Tensor:
    """A per-unit quantization parameter (scale, zero point) broadcast to the weight's shape."""
    if isinstance(granularity, PerGroup):
        grouped = numerics.to_groups(weight, granularity)
        full = numerics.expand_param(p, grouped, granularity).expand(grouped.shape)
        return full.reshape(weight.shape)
    return numerics.expand_param(p, weight, granularity).expand(weight.shape)


@contextmanager
def layer_progress(description: str, total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A progress bar advanced once per finished layer; yields `advance(layer_name)`."""
    if not enabled:
        yield lambda _name: None
        return
    from rich.progress import Progress

    with Progress(transient=True, console=stderr_console()) as bar:
        task = bar.add_task(description, total=total)

        def advance(name: str) -> None:
            bar.update(task, advance=1, description=f"{description} {name}")

        yield advance
