"""GPTQ (Frantar et al. 2022): second-order weight quantization with error compensation.

Every quantized Linear (and plain Conv1d / Conv2d, through their unfolded inputs), layer by layer
in execution order, gets its weight quantized one input column at a time; the rounding error of
each column is spread over the columns not yet quantized through the inverse Hessian of the layer's
squared output error, H = 2 X^T X / n, where X are the layer's inputs on the calibration data (as
the model computes them, with the layers before it already quantized: the sequential variant of
the paper). Layers that take the same input tensor (the query, key and value projections of an
attention block) do not depend on each other: one capture pass serves them all. Memory holds
those layers' Hessians and one batch of their inputs at a time.

Inside a process group each rank captures its shard; the Hessians are summed exactly (integer
grids, `lowbit.algorithms._hessian`), so they are the same bits for any split of the batches.
The solves are divided among the ranks: the layers of a group of siblings go to different
ranks, and a layer solved alone has its output rows divided (rows are independent given H).
Every rank then takes every result from the rank that solved it.

The result is written back into the float layer as the dequantized GPTQ values, with the layer's
weight quantizer parameters set to the ones GPTQ used, so that the existing weight quantizer (and
`lowbit.convert`, and the ONNX export) reproduce exactly the GPTQ integer codes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.algorithms._gptq_solve import GPTQResult, gptq_quantize_weight, layer_params
from lowbit.algorithms._hessian import GramSum
from lowbit.algorithms.capture import iter_group_inputs
from lowbit.batches import Forward, run_hooked
from lowbit.distributed import active_group, check_same, example_batch, gather_objects, rank, step
from lowbit.exceptions import LowbitWarning
from lowbit.nn.modules import QuantModule, quant_modules
from lowbit.nn.quantizer import Mode, TensorQuantizer
from lowbit.progress import progress_bar

__all__ = ["GPTQResult", "gptq", "gptq_quantize_weight"]


def gptq(
    qmodel: nn.Module,
    calib_data: Iterable[Any],
    *,
    forward: Forward | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    progress: bool = True,
    group: Any = None,
    scale_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Run GPTQ over every eligible quantized layer of `qmodel` (from `lowbit.quantize`), in place.

    Eligible: a `QuantModule` wrapping `nn.Linear`, `nn.Conv1d` or `nn.Conv2d` (groups=1, zero
    padding) whose weight quantizer is static, uniform and rounds to nearest. Its granularity is
    honoured: per-tensor and per-channel scales come from the original weight; per-group scales
    along the input dimension are computed from the updated weights when GPTQ reaches the group's
    first column (as the reference implementation does), or, with `act_order=True`, from the
    original weight up front ("static groups", so that a group keeps contiguous input columns).

    block_size: columns per lazy batch update (speed only; the result is the same).
    damp: added to the Hessian diagonal as a fraction of its mean (numerical stability).
    act_order: quantize columns in order of decreasing Hessian diagonal (largest inputs first).
    scale_dtype: every scale is rounded to this dtype before the codes are chosen, e.g.
        torch.float16 for GGUF's Q4_0 / Q8_0 blocks, which then hold the codes exactly.

    Returns `qmodel`. Raises ValueError for empty calibration data, bad arguments, or a model with
    no eligible layer; ineligible quantized layers are listed in a warning and left as they are.

    Inside torch.distributed (or with `group=`), `calib_data` is this rank's shard: each layer's
    Hessian is summed exactly over the ranks, the solves are divided among them, and every rank
    ends with the weights one process computes (see docs/distributed.md).
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be an nn.Module, got {type(qmodel).__name__}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not (isinstance(damp, int | float) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    group = active_group(group)
    example = example_batch(calib_data, group)
    layers = _eligible(qmodel, "GPTQ")
    groups = _sibling_groups(qmodel, [qm for _, qm in layers], example, forward)
    names = {id(qm): n for n, qm in layers}
    plan = "\n".join(" ".join(names[id(qm)] for qm in members) for members in groups)
    check_same(plan, group, "the GPTQ layers")
    was_training = qmodel.training
    qmodel.eval()
    switched: list[tuple[TensorQuantizer, Mode]] = []
    solve = _Solve(block_size, damp, act_order, group, scale_dtype)
    try:
        for members in progress_bar(groups, "GPTQ", enabled=progress and rank(group) == 0):
            for qm in members:
                # A layer's own weight is not used while its inputs are captured: skip its fake
                # quantization (the forward stops before the last member computes). Once solved,
                # its weight lies on the grid: fake quantization would return it unchanged, so
                # the capture passes of the layers after it skip that work too.
                assert qm.weight_quantizer is not None
                switched.append((qm.weight_quantizer, qm.weight_quantizer.mode))
                qm.weight_quantizer.set_mode("off")
            hessians = _hessians(qmodel, members, calib_data, forward, group)
            solve.run([(names[id(qm)], qm, h) for qm, h in zip(members, hessians, strict=True)])
    finally:
        for wq, _mode in switched:
            wq.set_mode("quantize" if wq.has_qparams else _mode)
        qmodel.train(was_training)
    return qmodel


def _sibling_groups(
    qmodel: nn.Module, layers: Sequence[QuantModule], example: Any, forward: Forward | None
) -> list[list[QuantModule]]:
    """`layers` in the order of their first call on `example`, consecutive layers that take the
    same input tensor (the same object, not changed in place in between: computed before any of
    them ran, so none of them changes another's input) in one group; layers that never run are
    left out."""
    calls: list[tuple[QuantModule, Any, int | None]] = []
    seen: set[int] = set()

    def make_hook(qm: QuantModule) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if id(qm) not in seen:
                seen.add(id(qm))
                x = args[0] if args else None  # kept alive: ids stay unique
                calls.append((qm, x, x._version if isinstance(x, Tensor) else None))

        return hook

    handles = [qm.register_forward_pre_hook(make_hook(qm)) for qm in layers]
    run_hooked(qmodel, example, forward, handles, "calib_data batch 0")
    groups: list[list[QuantModule]] = []
    previous: tuple[Any, int | None] = (None, None)
    for qm, x, version in calls:
        if groups and isinstance(x, Tensor) and x is previous[0] and version == previous[1]:
            groups[-1].append(qm)
        else:
            groups.append([qm])
        previous = (x, version)
    return groups


def _eligible(qmodel: nn.Module, algorithm: str) -> list[tuple[str, QuantModule]]:
    """Quantized Linear / Conv1d / Conv2d layers with a static, uniform, nearest quantizer."""
    found = quant_modules(qmodel)
    if not found:
        raise ValueError(
            f"{algorithm} found no quantized layers in the model: run lowbit.quantize(model, "
            "config, calib_data) first and pass the quantized model"
        )
    ok: list[tuple[str, QuantModule]] = []
    skipped: list[str] = []
    for name, qm in found.items():
        reason = _ineligible_reason(qm)
        if reason is None:
            ok.append((name, qm))
        else:
            skipped.append(f"{name} ({reason})")
    if not ok:
        raise ValueError(f"{algorithm} found no layer it can quantize: " + "; ".join(skipped))
    if skipped:
        warnings.warn(
            f"{algorithm} leaves {len(skipped)} layer(s) as they are: " + "; ".join(skipped),
            LowbitWarning,
            stacklevel=3,
        )
    return ok


def _ineligible_reason(qm: QuantModule) -> str | None:
    m = qm.module
    wq = qm.weight_quantizer
    if wq is None:
        return "its weight is not quantized"
    spec = wq.spec
    if spec.scheme != "uniform":
        return f"weight scheme {spec.scheme!r} is not uniform"
    if spec.rounding != "nearest":
        return f"weight rounding {spec.rounding!r} is not 'nearest'"
    if wq.dynamic or wq.learnable:
        return "its weight quantizer is dynamic or learnable (QAT), not static"
    if type(m) is nn.Linear:
        return None
    if type(m) in (nn.Conv1d, nn.Conv2d):
        assert isinstance(m, nn.Conv1d | nn.Conv2d)
        if m.groups != 1:
            return "grouped or depthwise convolution"
        if m.padding_mode != "zeros":
            return f"padding_mode {m.padding_mode!r}"
        return None
    return f"{type(m).__name__} layers are not supported"


def _conv_rows(m: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """A conv input unfolded to [positions, in * kernel] (the weight.reshape(out, -1) order)."""
    if isinstance(m, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, stride, dilation = (1, *m.kernel_size), (1, *m.stride), (1, *m.dilation)
        padding: Any = m.padding if isinstance(m.padding, str) else (0, *m.padding)
    else:
        kernel, stride, dilation, padding = m.kernel_size, m.stride, m.dilation, m.padding
    if x.dim() == 3:  # unbatched input
        x = x.unsqueeze(0)
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        pads: list[int] = []
        for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        padding = (0, 0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _hessians(
    qmodel: nn.Module,
    members: list[QuantModule],
    calib_data: Iterable[Any],
    forward: Forward | None,
    group: Any,
) -> list[Tensor]:
    """H = 2 X^T X / n of each member over every calibration row: X^T X exactly summed over the
    batches and the ranks (`GramSum`), n an exact integer. Members handed the same tensor
    share the product X^T X of each batch."""
    sums = [GramSum(qm.module.weight[0].numel(), qm.module.weight.device) for qm in members]
    with step(group, "GPTQ's capture of layer inputs"):
        if group is None or next(iter(calib_data), None) is not None:  # a shard may be empty
            _accumulate(qmodel, [qm.module for qm in members], sums, calib_data, forward)
    hessians = []
    for gram in sums:
        h, n = gram.total(group)
        if n == 0:
            raise ValueError("calibration data gave no input rows to the layer")
        hessians.append(h.mul_(2.0 / n))  # in place: the same bits, no second copy
    return hessians


def _accumulate(
    qmodel: nn.Module,
    inner: list[nn.Module],
    sums: list[GramSum],
    calib_data: Iterable[Any],
    forward: Forward | None,
) -> None:
    """Add each batch's X^T X of every layer in `inner` (the QuantModules' float layers: their
    input is what the weight multiplies, after any input quantizer) to its sum in `sums`."""
    for inputs in iter_group_inputs(qmodel, inner, calib_data, forward):
        products: dict[int, tuple[Tensor, int]] = {}
        for m, gram, args in zip(inner, sums, inputs, strict=True):
            x = args[0]
            key = id(x) if isinstance(m, nn.Linear) else id(m)  # conv rows: per layer
            if key not in products:
                rows = _rows(m, x).to(torch.float64)
                products[key] = (rows.T @ rows, rows.shape[0])
            gram.add(*products[key])


def _rows(m: nn.Module, x: Tensor) -> Tensor:
    """The rows the layer's weight multiplies: [rows, in_features] (Linear), unfolded (conv)."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    assert isinstance(m, nn.Conv1d | nn.Conv2d)
    return _conv_rows(m, x)


class _Solve:
    """The GPTQ solves of each group of layers, divided among the ranks of `group`.

    With at least as many layers in the group as ranks, layer i goes to rank i mod world;
    otherwise each layer's output rows are cut into one contiguous block per rank. The
    results travel to every rank (rank order), which writes every layer alike.
    """

    def __init__(
        self,
        block_size: int,
        damp: float,
        act_order: bool,
        group: Any,
        scale_dtype: torch.dtype | None,
    ) -> None:
        self.block_size, self.damp, self.act_order, self.group = block_size, damp, act_order, group
        self.scale_dtype = scale_dtype
        self.world = 1 if group is None else dist.get_world_size(group)
        self.rank = rank(group)

    def run(self, layers: list[tuple[str, QuantModule, Tensor]]) -> None:
        """Solve `layers` (name, layer, Hessian) and write the results into the layers."""
        by_layer = len(layers) >= self.world
        mine: dict[int, _Part] = {}
        with step(self.group, "GPTQ's solves"):
            for i, (name, qm, h) in enumerate(layers):
                if by_layer and i % self.world != self.rank:
                    continue
                rows = None if by_layer else self._rows(qm.module.weight.shape[0])
                mine[i] = self._solve(name, qm, h, rows)
        shards = gather_objects(mine, self.group)
        for i, (_name, qm, _h) in enumerate(layers):
            parts = [shard[i] for shard in shards if i in shard]
            _write(qm, parts, self.act_order, self.scale_dtype)

    def _rows(self, out: int) -> tuple[int, int]:
        per = -(-out // self.world)
        return min(self.rank * per, out), min((self.rank + 1) * per, out)

    def _solve(self, name: str, qm: QuantModule, h: Tensor, rows: tuple[int, int] | None) -> _Part:
        """GPTQ on the layer's weight, or on its rows [start, stop)."""
        weight: Tensor = qm.module.weight
        assert qm.weight_quantizer is not None
        spec = qm.weight_quantizer.spec
        group_cols, scale, zp, _params = layer_params(
            weight, spec, self.act_order, self.scale_dtype
        )
        w = weight.detach().reshape(weight.shape[0], -1)
        start, stop = (0, w.shape[0]) if rows is None else rows
        if start == stop:
            return _Part(w[:0].cpu(), [])
        try:
            result = gptq_quantize_weight(
                w[start:stop],
                h,
                spec,
                scale=None if scale is None else scale[start:stop],
                zero_point=None if zp is None else zp[start:stop],
                group_columns=group_cols,
                group_shape=tuple(weight.shape[2:]) if weight.dim() > 2 else (),
                block_size=self.block_size,
                damp=self.damp,
                act_order=self.act_order,
                scale_dtype=self.scale_dtype,
            )
        except ValueError as e:
            raise ValueError(f"GPTQ failed on layer {name!r}: {e}") from e
        params = [(s.cpu(), z.cpu()) for s, z in result.group_params]
        return _Part(result.weight.cpu(), params)


@dataclass
class _Part:
    """A solved weight, or a block of its rows, with its per-group parameters (on the CPU, to
    travel between ranks)."""

    weight: Tensor
    group_params: list[tuple[Tensor, Tensor]]


def _write(
    qm: QuantModule, parts: list[_Part], act_order: bool, scale_dtype: torch.dtype | None
) -> None:
    """Write the solved weight (its row blocks in rank order) and the parameters GPTQ used."""
    wq = qm.weight_quantizer
    assert wq is not None
    weight: Tensor = qm.module.weight
    _cols, _scale, _zp, params = layer_params(weight, wq.spec, act_order, scale_dtype)
    solved = torch.cat([p.weight for p in parts]).to(weight.device)
    with torch.no_grad():
        weight.copy_(solved.reshape(weight.shape).to(weight.dtype))
    if params is not None:
        wq.set_qparams(*params)
        return
    parts = [p for p in parts if p.group_params]  # a rank may have had no rows
    per_group = list(zip(*(p.group_params for p in parts), strict=True))
    scales = torch.stack([torch.cat([s for s, _ in g]) for g in per_group], 1).to(weight.device)
    zps = torch.stack([torch.cat([z for _, z in g]) for g in per_group], 1).to(weight.device)
    if weight.dim() > 2:  # [out, groups, *kernel]
        k = weight.shape[2:]
        scales = scales.reshape(weight.shape[0], -1, *k)
        zps = zps.reshape(weight.shape[0], -1, *k)
    wq.set_qparams(scales.float(), zps.to(torch.int32))
