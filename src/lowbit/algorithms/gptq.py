"""GPTQ (Frantar et al. 2022): second-order weight quantization with error compensation.

Every quantized Linear (and plain Conv1d / Conv2d, through their unfolded inputs), layer by layer
in execution order, gets its weight quantized one input column at a time; the rounding error of
each column is spread over the columns not yet quantized through the inverse Hessian of the layer's
squared output error, H = 2 X^T X / n, where X are the layer's inputs on the calibration data (as
the model computes them, with the layers before it already quantized: the sequential variant of
the paper). Memory holds one layer's Hessian and one batch of its inputs at a time.

The result is written back into the float layer as the dequantized GPTQ values, with the layer's
weight quantizer parameters set to the ones GPTQ used, so that the existing weight quantizer (and
`lowbit.convert`, and the ONNX export) reproduce exactly the GPTQ integer codes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit import numerics
from lowbit.algorithms.capture import execution_order, iter_layer_inputs
from lowbit.batches import Forward
from lowbit.distributed import (
    active_group,
    all_reduce,
    check_same,
    example_batch,
    gather_objects,
    step,
)
from lowbit.exceptions import LowbitWarning
from lowbit.nn.modules import QuantModule, quant_modules
from lowbit.nn.quantizer import Mode, TensorQuantizer
from lowbit.progress import progress_bar
from lowbit.spec import PerChannel, PerGroup, QuantSpec

__all__ = ["GPTQResult", "gptq", "gptq_quantize_weight"]


@dataclass(frozen=True)
class GPTQResult:
    """The output of `gptq_quantize_weight` for one 2-D weight [out, columns].

    weight: the dequantized GPTQ weight (float32, in the original column order).
    codes: its integer codes (int32).
    scale, zero_point: elementwise parameters of `weight`'s shape that produced the codes.
    group_params: for groups along the columns found on the fly, the list of (scale, zero point)
        per group in column order ([out] each); empty otherwise.
    """

    weight: Tensor
    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    group_params: list[tuple[Tensor, Tensor]]


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

    Returns `qmodel`. Raises ValueError for empty calibration data, bad arguments, or a model with
    no eligible layer; ineligible quantized layers are listed in a warning and left as they are.

    Inside torch.distributed (or with `group=`), `calib_data` is this rank's shard: each layer's
    Hessian and row count are summed over the ranks, and every rank solves the same problem.
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
    order = execution_order(qmodel, [qm for _, qm in layers], [example], forward)
    names = {id(qm): n for n, qm in layers}
    check_same("\n".join(names[id(qm)] for qm in order), group, "the GPTQ layers")
    was_training = qmodel.training
    qmodel.eval()
    switched: list[tuple[TensorQuantizer, Mode]] = []
    try:
        for qm in progress_bar(order, "GPTQ", enabled=progress):
            assert isinstance(qm, QuantModule) and qm.weight_quantizer is not None
            # The layer's own weight is not used while its inputs are captured: skip its
            # fake quantization (the forward stops before the layer computes).
            wq = qm.weight_quantizer
            switched.append((wq, wq.mode))
            wq.set_mode("off")
            h = _hessian(qmodel, qm, calib_data, forward, group)
            _gptq_layer(qm, h, block_size, damp, act_order, names[id(qm)])
            # Its weight now lies on the grid: fake quantization would return it unchanged, so
            # the capture passes of the layers after it can skip that work too.
            wq.set_mode("off")
    finally:
        for wq, _mode in switched:
            wq.set_mode("quantize" if wq.has_qparams else _mode)
        qmodel.train(was_training)
    return qmodel


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


def _hessian(
    qmodel: nn.Module,
    qm: QuantModule,
    calib_data: Iterable[Any],
    forward: Forward | None,
    group: Any,
) -> Tensor:
    """H = 2 X^T X / n over every calibration row, accumulated batch by batch in float64; in a
    group, X^T X and n are summed over the ranks (n exactly, as an integer)."""
    m = qm.module
    weight: Tensor = m.weight
    cols = weight[0].numel()
    h = torch.zeros(cols, cols, dtype=torch.float64, device=weight.device)
    n = 0
    # Hook the inner float layer: its input is what the weight multiplies (after any input
    # quantizer of the QuantModule).
    with step(group, "GPTQ's capture of layer inputs"):
        for args in iter_layer_inputs(qmodel, m, calib_data, forward):
            x = args[0]
            if isinstance(m, nn.Linear):
                rows = x.reshape(-1, x.shape[-1])
            else:
                assert isinstance(m, nn.Conv1d | nn.Conv2d)
                rows = _conv_rows(m, x)
            rows = rows.to(torch.float64)
            h += rows.T @ rows
            n += rows.shape[0]
    if group is not None:
        h = all_reduce(h, group)
        n = sum(gather_objects(n, group))
    if n == 0:
        raise ValueError("calibration data gave no input rows to the layer")
    return h * (2.0 / n)


def _gptq_layer(
    qm: QuantModule,
    h: Tensor,
    block_size: int,
    damp: float,
    act_order: bool,
    name: str,
) -> None:
    m = qm.module
    wq = qm.weight_quantizer
    assert wq is not None
    weight: Tensor = m.weight
    spec = wq.spec
    group_cols, static_scale, static_zp, params = _layer_params(weight, spec, act_order)
    try:
        result = gptq_quantize_weight(
            weight.detach().reshape(weight.shape[0], -1),
            h,
            spec,
            scale=static_scale,
            zero_point=static_zp,
            group_columns=group_cols,
            group_shape=tuple(weight.shape[2:]) if weight.dim() > 2 else (),
            block_size=block_size,
            damp=damp,
            act_order=act_order,
        )
    except ValueError as e:
        raise ValueError(f"GPTQ failed on layer {name!r}: {e}") from e
    with torch.no_grad():
        weight.copy_(result.weight.reshape(weight.shape).to(weight.dtype))
    if params is not None:
        wq.set_qparams(*params)
    else:
        scales = torch.stack([s for s, _ in result.group_params], 1)
        zps = torch.stack([z for _, z in result.group_params], 1)
        if weight.dim() > 2:  # [out, groups, *kernel]
            k = weight.shape[2:]
            scales = scales.reshape(weight.shape[0], -1, *k)
            zps = zps.reshape(weight.shape[0], -1, *k)
        wq.set_qparams(scales.float(), zps.to(torch.int32))


def _layer_params(
    weight: Tensor, spec: QuantSpec, act_order: bool
) -> tuple[int | None, Tensor | None, Tensor | None, tuple[Tensor, Tensor] | None]:
    """Columns per on-the-fly group (None: static parameters); else the static elementwise scale
    and zero point of the 2-D view [out, columns] and the parameters in the spec's shape."""
    g = spec.granularity
    dyn_cols: int | None = None
    if isinstance(g, PerGroup):
        axis = g.axis % weight.dim()
        if axis == 1:
            kernel = math.prod(weight.shape[2:])
            dyn_cols = g.size * kernel
    elif isinstance(g, PerChannel) and g.axis % weight.dim() != 0:
        raise ValueError(f"a weight spec per channel along axis {g.axis} is not supported by GPTQ")
    if dyn_cols is not None and not act_order:
        if weight[0].numel() % dyn_cols:
            raise ValueError(
                f"PerGroup size {g.size} does not divide the layer's input dimension"  # type: ignore[union-attr]
            )
        return dyn_cols, None, None, None
    scale, zp = numerics.tensor_qparams(weight.detach(), spec)
    es, ez = _elementwise(scale, zp, weight, spec)
    rows = weight.shape[0]
    return None, es.reshape(rows, -1), ez.reshape(rows, -1), (scale, zp)


def _elementwise(scale: Tensor, zp: Tensor, w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point broadcast to `w`'s shape."""
    g = spec.granularity
    if isinstance(g, PerGroup):
        wg = numerics.to_groups(w, g)
        s = numerics.expand_param(scale, wg, g).expand(wg.shape).reshape(w.shape)
        z = numerics.expand_param(zp, wg, g).expand(wg.shape).reshape(w.shape)
        return s, z
    s = numerics.expand_param(scale, w, g).expand(w.shape)
    z = numerics.expand_param(zp, w, g).expand(w.shape)
    return s, z


def _inverse_hessian_cholesky(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, retrying with more damping."""
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp * mean_diag if mean_diag > 0 else 1.0
    for _ in range(6):
        hd = h + lam * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u
        lam = max(lam * 10, 1e-8)
    raise ValueError(
        "the layer's Hessian is not positive definite even with extra damping; "
        "pass more calibration data or a larger damp"
    )


def _quantize_column(w: Tensor, s: Tensor, z: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Codes and dequantized values of one column (elementwise scale / zero point)."""
    q = torch.clamp(torch.round(w / s) + z, spec.qmin, spec.qmax)
    return q, (q - z) * s


def gptq_quantize_weight(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    *,
    scale: Tensor | None = None,
    zero_point: Tensor | None = None,
    group_columns: int | None = None,
    group_shape: tuple[int, ...] = (),
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> GPTQResult:
    """GPTQ on one 2-D weight [out, columns] with the Hessian [columns, columns] of its inputs.

    Either `scale` / `zero_point` are elementwise [out, columns] (static parameters), or
    `group_columns` gives groups of that many consecutive columns whose parameters are computed
    (with `spec`'s rule, per row) from the current weights when the group's first column is
    reached. `group_shape` (a conv kernel's shape) makes each group's parameters per row and per
    kernel position, as PerGroup along a conv weight's input channels does.
    """
    if (scale is None) == (group_columns is None):
        raise ValueError("pass either static scale / zero_point or group_columns")
    if act_order and group_columns is not None:
        raise ValueError("act_order needs static parameters (static groups)")
    w, h, es, ez, perm = _prepared(weight, hessian, scale, zero_point, act_order)
    cols = w.shape[1]
    u = _inverse_hessian_cholesky(h, damp)
    bs = block_size
    if group_columns is not None:  # keep every group inside one block
        bs = max(group_columns, (block_size // group_columns) * group_columns)
    q_all = torch.zeros_like(w)
    codes = torch.zeros_like(w)
    group_params: list[tuple[Tensor, Tensor]] = []
    per_row_spec = spec.with_(granularity=PerChannel(0))
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_columns is not None and col % group_columns == 0:
                block = w1[:, i : i + group_columns].float()
                s, z, params = _group_qparams(block, per_row_spec, group_shape)
                es[:, col : col + group_columns] = s.to(w.dtype)
                ez[:, col : col + group_columns] = z.to(w.dtype)
                group_params += params
            wc = w1[:, i]
            qc, deq = _quantize_column(wc, es[:, col], ez[:, col], spec)
            codes[:, col] = qc
            q_all[:, col] = deq
            e = (wc - deq) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        q_all, codes, es, ez = q_all[:, inv], codes[:, inv], es[:, inv], ez[:, inv]
    return GPTQResult(
        weight=q_all.float(),
        codes=codes.to(torch.int32),
        scale=es.float(),
        zero_point=ez.to(torch.int32),
        group_params=group_params,
    )


def _prepared(
    weight: Tensor,
    hessian: Tensor,
    scale: Tensor | None,
    zero_point: Tensor | None,
    act_order: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Working copies (float64 on CPU) of the weight, Hessian and elementwise parameters, dead
    inputs (zero Hessian diagonal) zeroed, columns in act order (and that order) if asked."""
    numerics.check_finite(weight.detach(), "weight")
    numerics.check_finite(hessian, "Hessian")
    dtype = torch.float64 if weight.device.type == "cpu" else torch.float32
    w = weight.detach().to(dtype).clone()
    h = hessian.to(dtype).clone()
    cols = w.shape[1]
    if h.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match {cols} weight columns")
    es = scale.to(dtype).clone() if scale is not None else torch.ones_like(w)
    ez = zero_point.to(dtype).clone() if zero_point is not None else torch.zeros_like(w)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if not act_order:
        return w, h, es, ez, None
    perm = torch.argsort(torch.diag(h), descending=True)
    return w[:, perm], h[perm][:, perm], es[:, perm], ez[:, perm], perm


def _group_qparams(
    block: Tensor, per_row_spec: QuantSpec, group_shape: tuple[int, ...]
) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """A group's parameters from its current weights `block` [out, group columns]: elementwise
    over the block, and as the (scale, zero point) per row of each kernel position (one pair
    without `group_shape`)."""
    n_out, size = block.shape
    if not group_shape:
        s, z = numerics.tensor_qparams(block, per_row_spec)
        return s.unsqueeze(1).expand(n_out, size), z.unsqueeze(1).expand(n_out, size), [(s, z)]
    k = math.prod(group_shape)
    # [out, size, k] -> per (row, kernel position) over the group's channels
    sub = block.reshape(n_out, -1, k).transpose(1, 2).reshape(n_out * k, -1)
    s, z = numerics.tensor_qparams(sub, per_row_spec)
    s, z = s.reshape(n_out, k), z.reshape(n_out, k)
    params = [(s[:, j], z[:, j]) for j in range(k)]
    return s.repeat(1, size // k), z.repeat(1, size // k), params
