"""AWQ (Lin et al. 2023): activation-aware weight scaling for weight-only low-bit quantization.

The weight columns that meet large activations matter most. AWQ multiplies them by
s = mean|x|^alpha (per input channel) before quantization and divides the input by s, which keeps
the float function, x W^T = (x / s) (W * s)^T, and shrinks the relative rounding error of the
salient columns. alpha is searched on a grid in [0, 1) per layer (or per group of layers reading
one tensor) to minimise the output error of the quantized, scaled layer against the float layer on
the calibration inputs; alpha = 0 is rounding to nearest, so AWQ never does worse than it on those
inputs.

Where 1/s goes:
- folded into the LayerNorm or (float) Linear that produces the layer's input, when a trial fold
  shows that the producer feeds nothing else (Q, K and V reading one LayerNorm then share one s);
- otherwise into an explicit `InputScale` wrapper around the `QuantModule` (the layer becomes
  `<name>.layer`), which multiplies the input by 1/s. `lowbit.convert` converts the wrapped layer
  and keeps the wrapper, so the integer model stays exact.
Then the weight quantizer's parameters are set again from the scaled weight.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lowbit import numerics
from lowbit.algorithms.capture import capture_inputs
from lowbit.algorithms.smoothquant import ScaleGroup, find_scale_groups, fold_scale, foldable
from lowbit.batches import Forward
from lowbit.distributed import active_group, example_batch, gather_shards
from lowbit.nn.input_scale import InputScale
from lowbit.nn.modules import QuantModule, quant_modules
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.progress import progress_bar

__all__ = ["InputScale", "awq", "awq_group", "search_scale"]

_MAX_ROWS = 8192


def awq(
    qmodel: nn.Module,
    calib_data: Iterable[Any],
    *,
    forward: Forward | None = None,
    grid: int = 20,
    progress: bool = True,
    group: Any = None,
) -> nn.Module:
    """Apply AWQ scaling to every weight-only quantized Linear of `qmodel`, in place.

    `qmodel` comes from `lowbit.quantize` with a weight-only uniform config (e.g.
    `presets.weight_only(4, 128)`). grid: how many values of alpha in [0, 1) to try.
    `qmodel.lowbit_awq` records, per group, the layer names, the chosen alpha and where 1/s went.
    Returns `qmodel`. Inside torch.distributed (or with `group=`), `calib_data` is this rank's
    shard: each search runs on every rank's captured rows in rank order (the first 8,192), so
    contiguous shards give the scales of one process.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be an nn.Module, got {type(qmodel).__name__}")
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    group = active_group(group)
    example = [example_batch(calib_data, group)]
    layers = _eligible_linears(qmodel)
    was_training = qmodel.training
    qmodel.eval()
    records: list[dict[str, Any]] = []
    try:
        groups = find_scale_groups(qmodel, layers, example, forward)
        plan: list[ScaleGroup] = []
        for g in groups:
            if g.producer is not None and foldable(qmodel, g, example, forward):
                plan.append(g)
            else:  # each layer on its own, with an explicit input scale
                plan += [
                    ScaleGroup(None, None, [n], [m])
                    for n, m in zip(g.consumer_names, g.consumers, strict=True)
                ]
        for g in progress_bar(plan, "AWQ", enabled=progress):
            records.append(awq_group(qmodel, g, calib_data, forward, grid, group))
    finally:
        qmodel.train(was_training)
    qmodel.lowbit_awq = records  # type: ignore[assignment]
    return qmodel


def _eligible_linears(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    found = quant_modules(qmodel)
    if not found:
        raise ValueError(
            "AWQ found no quantized layers in the model: run lowbit.quantize(model, "
            "presets.weight_only(4, 128), calib_data) first and pass the quantized model"
        )
    ok: list[tuple[str, nn.Module]] = []
    problems: list[str] = []
    for name, qm in found.items():
        wq = qm.weight_quantizer
        if not isinstance(qm.module, nn.Linear) or wq is None:
            continue
        if wq.spec.scheme != "uniform":
            problems.append(f"{name}: weight scheme {wq.spec.scheme!r} is not uniform")
        elif wq.dynamic or wq.learnable:
            problems.append(f"{name}: dynamic or learnable weight quantizer (QAT)")
        elif qm.input_quantizer is not None and qm.input_quantizer.mode != "off":
            problems.append(
                f"{name}: its input is quantized; AWQ is for weight-only quantization (scaling "
                "the input would invalidate its calibrated range)"
            )
        else:
            ok.append((name, qm))
    if problems:
        raise ValueError("AWQ cannot process: " + "; ".join(problems))
    if not ok:
        raise ValueError("AWQ found no quantized nn.Linear layer in the model")
    return ok


def _fake_quant_weight(w: Tensor, qm: QuantModule) -> Tensor:
    wq = qm.weight_quantizer
    assert wq is not None
    scale, zp = numerics.tensor_qparams(w, wq.spec)
    return numerics.fake_quantize(w, scale, zp, wq.spec)


def search_scale(
    x: Tensor, layers: list[QuantModule], grid: int
) -> tuple[Tensor, float, float, float]:
    """The best s = mean|x|^alpha for `layers` reading `x` [rows, in]; returns
    (s, alpha, error at alpha, error of rounding to nearest), errors as output MSE summed."""
    x = x.float()
    x_mean = x.abs().mean(0)
    weights = [qm.module.weight.detach().float() for qm in layers]
    refs = [x @ w.T for w in weights]
    best: tuple[float, float, Tensor] | None = None
    rtn_err = float("nan")
    for k in range(grid):
        alpha = k / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        xs = x / s
        err = 0.0
        for qm, w, ref in zip(layers, weights, refs, strict=True):
            wq = _fake_quant_weight(w * s, qm)
            err += float((xs @ wq.T - ref).pow(2).mean())
        if k == 0:
            rtn_err = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    return best[2], best[1], best[0], rtn_err


def _capture(
    qmodel: nn.Module,
    layer: nn.Module,
    calib_data: Iterable[Any],
    forward: Forward | None,
    group: Any,
) -> Tensor:
    """The first `_MAX_ROWS` input rows of `layer`; in a group, every rank's rows in rank order
    (a rank without batches has none)."""
    if group is None:
        return capture_inputs(qmodel, layer, calib_data, forward, max_rows=_MAX_ROWS)
    capture = partial(capture_inputs, qmodel, layer, calib_data, forward, max_rows=_MAX_ROWS)
    shards = gather_shards(calib_data, group, "AWQ's capture of layer inputs", capture)
    return torch.cat(shards)[:_MAX_ROWS]


def awq_group(
    qmodel: nn.Module,
    g: ScaleGroup,
    calib_data: Iterable[Any],
    forward: Forward | None = None,
    grid: int = 20,
    group: Any = None,
) -> dict[str, Any]:
    """AWQ for one group of layers reading one tensor: search alpha, fold the factors into
    `g.producer` (or wrap a lone layer in `InputScale`), set the weight quantizers again; its
    record. `awq` runs it for every group it finds; `lowbit.pretrained` for the groups it knows."""
    layers = [m for m in g.consumers if isinstance(m, QuantModule)]
    # Inputs of the float model, as the reference implementation uses (and no fake
    # quantization work on the way).
    quantizers = [q for q in qmodel.modules() if isinstance(q, TensorQuantizer)]
    modes = [q.mode for q in quantizers]
    try:
        for q in quantizers:
            q.set_mode("off")
        x = _capture(qmodel, layers[0], calib_data, forward, group)
    finally:
        for q, mode in zip(quantizers, modes, strict=True):
            q.mode = mode
    s, alpha, err, rtn_err = search_scale(x, layers, grid)
    s = s.to(layers[0].module.weight.dtype)
    if alpha == 0.0:  # s == 1: rounding to nearest was best, nothing to change
        where = None
    elif g.producer is not None:
        fold_scale(g, s)
        where = g.producer_name
    else:
        name = g.consumer_names[0]
        with torch.no_grad():
            layers[0].module.weight.mul_(s)
        qmodel.set_submodule(name, InputScale(layers[0], 1.0 / s))
        where = f"{name}.inv_scale"
    for qm in layers:
        assert qm.weight_quantizer is not None
        qm.weight_quantizer.set_qparams_from(qm.module.weight)
    return {
        "layers": list(g.consumer_names),
        "alpha": alpha,
        "inverse_scale_in": where,
        "output_mse": err,
        "output_mse_rtn": rtn_err,
    }
