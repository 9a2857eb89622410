"""The GPTQ solve of one weight (Frantar et al. 2022): columns quantized one at a time, each
column's rounding error spread over the columns not yet quantized through the inverse Hessian.

`lowbit.algorithms.gptq` gathers each layer's Hessian and calls `gptq_quantize_weight`; the solve
works row by row (every output row of the weight is independent given the Hessian), so a process
group may divide a layer's rows among its ranks and get the rows one process would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit import numerics
from lowbit.spec import PerChannel, PerGroup, QuantSpec

__all__ = ["GPTQResult", "gptq_quantize_weight", "layer_params"]


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


def layer_params(
    weight: Tensor, spec: QuantSpec, act_order: bool, scale_dtype: torch.dtype | None = None
) -> tuple[int | None, Tensor | None, Tensor | None, tuple[Tensor, Tensor] | None]:
    """Columns per on-the-fly group (None: static parameters); else the static elementwise scale
    and zero point of the 2-D view [out, columns] and the parameters in the spec's shape (the
    scale rounded to `scale_dtype` if given)."""
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
    if scale_dtype is not None:
        scale = numerics.representable_scale(scale, scale_dtype)
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


def _inverse_hessian_cholesky(h: Tensor, diag: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, retrying with more damping;
    H is `h` with the diagonal `diag`.

    Memory: one matrix beside `h`. The damped diagonal goes into `h` in place (its own diagonal
    is restored before returning), and the factor, its inverse and the inverse's factor are each
    computed into the same new matrix (LAPACK works in place), with the values separate results
    would have: the bits are those of the textbook formula, without its five temporaries.
    """
    original = torch.diag(h).clone()
    mean_diag = float(diag.mean())
    lam = damp * mean_diag if mean_diag > 0 else 1.0
    info = torch.zeros((), dtype=torch.int32, device=h.device)
    try:
        for _ in range(6):
            h.diagonal().copy_(diag + lam)
            chol, info = torch.linalg.cholesky_ex(h)
            if int(info) == 0:
                torch.cholesky_inverse(chol, out=chol)
                torch.linalg.cholesky_ex(chol, upper=True, out=(chol, info))
                if int(info) == 0:
                    return chol
            del chol
            lam = max(lam * 10, 1e-8)
    finally:
        h.diagonal().copy_(original)
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
    scale_dtype: torch.dtype | None = None,
) -> GPTQResult:
    """GPTQ on one 2-D weight [out, columns] with the Hessian [columns, columns] of its inputs.

    Either `scale` / `zero_point` are elementwise [out, columns] (static parameters), or
    `group_columns` gives groups of that many consecutive columns whose parameters are computed
    (with `spec`'s rule, per row) from the current weights when the group's first column is
    reached. `group_shape` (a conv kernel's shape) makes each group's parameters per row and per
    kernel position, as PerGroup along a conv weight's input channels does. `scale_dtype`: the
    groups' scales are rounded to it before their codes are chosen (a file that stores float16
    scales then holds the codes exactly); static scales are the caller's (`layer_params`).
    """
    if (scale is None) == (group_columns is None):
        raise ValueError("pass either static scale / zero_point or group_columns")
    if act_order and group_columns is not None:
        raise ValueError("act_order needs static parameters (static groups)")
    w, h, diag, es, ez, perm = _prepared(weight, hessian, scale, zero_point, act_order)
    cols = w.shape[1]
    u = _inverse_hessian_cholesky(h, diag, damp)
    del h  # the caller's Hessian (unchanged), or act order's permuted copy
    bs = block_size
    if group_columns is not None:  # keep every group inside one block
        bs = max(group_columns, (block_size // group_columns) * group_columns)
    # the results in their final dtypes: each value is converted once, as at the end
    q_all = torch.zeros_like(w, dtype=torch.float32)
    codes = torch.zeros_like(w, dtype=torch.int32)
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
                s, z, params = _group_qparams(block, per_row_spec, group_shape, scale_dtype)
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
        weight=q_all,
        codes=codes,
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Working copies (float64 on CPU) of the weight and elementwise parameters, dead inputs
    (zero Hessian diagonal) zeroed, columns in act order (and that order) if asked; the Hessian
    (the caller's own tensor where it already has the working dtype: it is not written but for
    the damping, undone) and its diagonal with dead inputs set to 1.

    Parameters found on the fly (groups) are float32 values: they are held as float32, which
    takes half the memory and gives the same arithmetic (float32 promotes exactly)."""
    numerics.check_finite(weight.detach(), "weight")
    numerics.check_finite(hessian, "Hessian")
    dtype = torch.float64 if weight.device.type == "cpu" else torch.float32
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype)
    if not h.is_contiguous():
        h = h.contiguous()
    cols = w.shape[1]
    if h.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match {cols} weight columns")
    f32 = torch.float32
    es = scale.to(dtype).clone() if scale is not None else torch.ones_like(w, dtype=f32)
    ez = zero_point.to(dtype).clone() if zero_point is not None else torch.zeros_like(es)
    diag = torch.diag(h).clone()
    dead = diag == 0
    diag[dead] = 1.0
    w[:, dead] = 0.0
    if not act_order:
        return w, h, diag, es, ez, None
    perm = torch.argsort(diag, descending=True)
    h = h[perm]
    h = h[:, perm]
    return w[:, perm], h, diag[perm], es[:, perm], ez[:, perm], perm


def _group_qparams(
    block: Tensor,
    per_row_spec: QuantSpec,
    group_shape: tuple[int, ...],
    scale_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """A group's parameters from its current weights `block` [out, group columns]: elementwise
    over the block, and as the (scale, zero point) per row of each kernel position (one pair
    without `group_shape`); scales rounded to `scale_dtype` if given."""
    n_out, size = block.shape
    if not group_shape:
        s, z = _row_qparams(block, per_row_spec, scale_dtype)
        return s.unsqueeze(1).expand(n_out, size), z.unsqueeze(1).expand(n_out, size), [(s, z)]
    k = math.prod(group_shape)
    # [out, size, k] -> per (row, kernel position) over the group's channels
    sub = block.reshape(n_out, -1, k).transpose(1, 2).reshape(n_out * k, -1)
    s, z = _row_qparams(sub, per_row_spec, scale_dtype)
    s, z = s.reshape(n_out, k), z.reshape(n_out, k)
    params = [(s[:, j], z[:, j]) for j in range(k)]
    return s.repeat(1, size // k), z.repeat(1, size // k), params


def _row_qparams(
    rows: Tensor, spec: QuantSpec, scale_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """Per-row (scale, zero point) of `rows`; the scale rounded to `scale_dtype` if given (the
    zero point, an integer code, is kept: it is as valid on the rounded grid)."""
    s, z = numerics.tensor_qparams(rows, spec)
    if scale_dtype is None:
        return s, z
    return numerics.representable_scale(s, scale_dtype), z
