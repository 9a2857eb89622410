"""Pure tensor functions that define lowbit's arithmetic; every other layer calls these.

Conventions, shared with ONNX QuantizeLinear / DequantizeLinear so exports agree bit for bit:
  q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)
  x' = (q - zero_point) * scale               (float32 throughout)

Scale and zero-point shapes follow the granularity: `PerTensor` -> a 0-d tensor; `PerChannel(axis)`
-> `[x.shape[axis]]`; `PerGroup(size, axis)` -> `x.shape` with `axis` replaced by the group count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lowbit.spec import Granularity, PerChannel, PerGroup, PerTensor, QuantSpec

# A zero (or denormal) range would give a zero scale and NaN on division; ONNX Runtime's quantizer
# uses 1.0 there too.
_DEGENERATE_SCALE = 1.0
_TINY = torch.finfo(torch.float32).tiny
# TWN (Li et al. 2016): weights with |w| <= 0.7 * mean|w| become zero.
TERNARY_THRESHOLD = 0.7
# The random source of stochastic rounding (None: torch's global one).
Rng = torch.Generator | None


def check_finite(x: Tensor, name: str = "input") -> None:
    """Raise ValueError if `x` holds NaN or Inf: they would silently poison every scale."""
    if x.is_floating_point() and x.numel() and not _all_finite(x):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name} holds {n_bad} NaN or Inf value(s); quantization needs finite data"
        )


def _all_finite(x: Tensor) -> bool:
    """NaN propagates to min and max, Inf is one of them: one reduction, no boolean copy of `x`
    (about 10x faster than isfinite().all() on activations, checked on every calibration batch)."""
    lo, hi = torch.aminmax(x.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _axis(x: Tensor, axis: int) -> int:
    if not -x.dim() <= axis < x.dim():
        raise ValueError(
            f"granularity axis {axis} is out of range for a tensor of shape {tuple(x.shape)}"
        )
    return axis % x.dim()


def to_groups(x: Tensor, group: PerGroup) -> Tensor:
    """Split `group.axis` into (groups, size): shape [..., n_groups, size, ...]."""
    axis = _axis(x, group.axis)
    length = x.shape[axis]
    if length % group.size:
        raise ValueError(
            f"PerGroup size {group.size} does not divide dimension {axis} of "
            f"length {length} (shape {tuple(x.shape)})"
        )
    return x.unflatten(axis, (length // group.size, group.size))


def from_groups(xg: Tensor, group: PerGroup, shape: torch.Size) -> Tensor:
    """Undo `to_groups`."""
    return xg.reshape(shape)


def reduce_by(x: Tensor, granularity: Granularity, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply a row reduction `fn([units, elements]) -> [units]` per scale unit.

    The result has the parameter shape of the granularity (see the module docstring).
    """
    if x.numel() == 0:
        raise ValueError(
            f"cannot compute quantization parameters of an empty tensor (shape {tuple(x.shape)})"
        )
    if isinstance(granularity, PerTensor):
        return fn(x.reshape(1, -1)).reshape(())
    if isinstance(granularity, PerChannel):
        axis = _axis(x, granularity.axis)
        return fn(x.movedim(axis, 0).reshape(x.shape[axis], -1))
    xg = to_groups(x, granularity)
    axis = _axis(x, granularity.axis)
    rows = xg.movedim(axis + 1, -1)
    return fn(rows.reshape(-1, granularity.size)).reshape(rows.shape[:-1])


def expand_param(p: Tensor, x: Tensor, granularity: Granularity) -> Tensor:
    """View a per-unit parameter so it broadcasts against `x` (grouped `x` for PerGroup)."""
    if isinstance(granularity, PerTensor):
        return p.reshape(())
    if isinstance(granularity, PerChannel):
        axis = _axis(x, granularity.axis)
        shape = [1] * x.dim()
        shape[axis] = -1
        return p.reshape(shape)
    # x is already grouped here: [..., n_groups, size, ...]; p is [..., n_groups, ...].
    axis = granularity.axis % (x.dim() - 1)
    return p.unsqueeze(axis + 1)


def tensor_range(x: Tensor, granularity: Granularity) -> tuple[Tensor, Tensor]:
    """Min and max of `x` per scale unit."""
    check_finite(x)
    x = x.detach().float()
    return reduce_by(x, granularity, lambda r: r.amin(1)), reduce_by(
        x, granularity, lambda r: r.amax(1)
    )


def qparams(lo: Tensor | float, hi: Tensor | float, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) that map the real range [lo, hi] onto the grid.

    The range is widened to include 0 so that zero is exactly representable (padding, ReLU).
    Symmetric: zero point 0 and scale = max|range| / qmax. Affine: the range spans qmin..qmax.
    A zero range gives scale 1, never NaN or Inf.
    """
    if spec.scheme in ("binary", "ternary"):
        raise ValueError(
            f"scheme {spec.scheme!r} takes its scale from the tensor itself: "
            "use tensor_qparams(x, spec)"
        )
    lo_t = torch.as_tensor(lo, dtype=torch.float32)
    hi_t = torch.as_tensor(hi, dtype=torch.float32)
    check_finite(lo_t, "range minimum")
    check_finite(hi_t, "range maximum")
    if bool((lo_t > hi_t).any()):
        raise ValueError("range minimum is greater than range maximum")
    lo_t = torch.clamp(lo_t, max=0.0)
    hi_t = torch.clamp(hi_t, min=0.0)
    zero_point = torch.zeros(lo_t.shape, dtype=torch.int32)
    if spec.scheme == "log2":
        return _finite_scale(torch.maximum(-lo_t, hi_t), spec), zero_point
    if spec.symmetric:
        top = torch.maximum(-lo_t, hi_t) if spec.signed else hi_t
        return _finite_scale(top / spec.qmax, spec), zero_point
    scale = _finite_scale((hi_t - lo_t) / (spec.qmax - spec.qmin), spec)
    zero_point = torch.clamp(torch.round(spec.qmin - lo_t / scale), spec.qmin, spec.qmax)
    return scale, zero_point.to(torch.int32)


def _finite_scale(scale: Tensor, spec: QuantSpec) -> Tensor:
    scale = torch.where(scale > _TINY, scale, torch.full_like(scale, _DEGENERATE_SCALE))
    if spec.scale_type == "pow2":
        pow2 = torch.exp2(torch.ceil(torch.log2(scale)))
        # float32 log2 rounds to the integer just above it for scales a few ulps over a power of
        # two: the power of two found would then be below the scale; take the next one up.
        scale = torch.where(pow2 < scale, pow2 * 2, pow2)
    return scale


def representable_scale(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """`scale` rounded to the nearest value of `dtype` (a file's scale type: GGUF's blocks store
    float16), kept in `scale`'s dtype, so that codes chosen with it mean the same weights once
    stored; clamped into `dtype`'s positive finite range (never 0 or inf)."""
    info = torch.finfo(dtype)
    low = info.smallest_normal * info.eps  # the smallest positive (subnormal) value
    return scale.clamp(low, info.max).to(dtype).to(scale.dtype)


def tensor_qparams(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Quantization parameters taken from the tensor itself (weights).

    Uniform and log2 use its min and max; binary the mean |x| (XNOR-Net); ternary the mean of
    the |x| kept above the TWN threshold.
    """
    check_finite(x)
    x = x.detach().float()
    g = spec.granularity
    if spec.scheme == "binary":
        scale = reduce_by(x, g, lambda r: r.abs().mean(1))
    elif spec.scheme == "ternary":
        scale = reduce_by(x, g, _ternary_scale_rows)
    else:
        return qparams(*tensor_range(x, g), spec)
    return _finite_scale(scale, spec), torch.zeros(scale.shape, dtype=torch.int32)


def _ternary_threshold_rows(rows: Tensor) -> Tensor:
    return TERNARY_THRESHOLD * rows.abs().mean(1)


def _ternary_scale_rows(rows: Tensor) -> Tensor:
    kept = rows.abs() > _ternary_threshold_rows(rows).unsqueeze(1)
    return (rows.abs() * kept).sum(1) / kept.sum(1).clamp_min(1)


def _layout(x: Tensor, g: Granularity) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Grouped view of `x` (for PerGroup) and the function that restores its shape."""
    if isinstance(g, PerGroup):
        shape = x.shape
        return to_groups(x, g), lambda t: from_groups(t, g, shape)
    return x, lambda t: t


def quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, *, generator: Rng = None
) -> Tensor:
    """Real values to integer codes, in `spec.storage_dtype`."""
    check_finite(x)
    xg, restore = _layout(x.detach().float(), spec.granularity)
    s = expand_param(scale.float(), xg, spec.granularity)
    if spec.scheme == "uniform":
        z = expand_param(zero_point, xg, spec.granularity).float()
        q = torch.clamp(_round(xg / s, spec, generator) + z, spec.qmin, spec.qmax)
    elif spec.scheme == "log2":
        q = _log2_codes(xg, s, spec)
    else:
        q = _sign_codes(xg, spec)
    return restore(q).to(spec.storage_dtype)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Integer codes back to float32 reals."""
    qg, restore = _layout(q, spec.granularity)
    s = expand_param(scale.float(), qg, spec.granularity)
    if spec.scheme == "log2":
        levels = qg.to(torch.int32)
        magnitude = torch.exp2((levels.abs() - spec.log2_levels).float()) * s
        return restore(torch.where(levels == 0, 0.0, torch.sign(levels) * magnitude))
    z = expand_param(zero_point, qg, spec.granularity).to(torch.int32)
    return restore((qg.to(torch.int32) - z).float() * s)


def fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, *, generator: Rng = None
) -> Tensor:
    """dequantize(quantize(x)) that stays differentiable.

    Uniform: the straight-through estimator, gradient 1 inside the clipping range and 0 outside;
    if `scale` requires grad it learns as in LSQ (Esser et al. 2020), gradient scaled by
    1 / sqrt(elements per scale * qmax). Other schemes pass the gradient straight through.
    """
    check_finite(x)
    if spec.scheme != "uniform":
        with torch.no_grad():
            y = dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec)
        # y + 0 (exactly y, unlike x + (y - x)) whose gradient w.r.t. x is 1.
        return y.to(x.dtype) + (x - x.detach())
    xg, restore = _layout(x, spec.granularity)
    s = expand_param(scale, xg, spec.granularity).to(x.dtype)
    if scale.requires_grad:
        s = _scale_gradient(s, 1.0 / math.sqrt(x.numel() / scale.numel() * spec.qmax))
    z = expand_param(zero_point, xg, spec.granularity).to(x.dtype)
    q = torch.clamp(_RoundSTE.apply(xg / s, spec, generator) + z, spec.qmin, spec.qmax)
    return restore((q - z) * s)


def centered_sign(
    x: Tensor, center: Tensor, scale: Tensor, axis: int, ternary: bool = False
) -> Tensor:
    """Binary activation around a per-channel centre: c + scale * sign(x - c), sign(0) = +1;
    ternary=True: c + scale * t, t = sign(x - c) where |x - c| > scale / 2, else 0 (the nearest
    of the three levels c - scale, c, c + scale; ties go to c).

    The centre makes a sign carry information where x does not change sign (ReLU outputs):
    XNOR-Net binarizes after a BatchNorm, ReActNet (Liu et al. 2020) learns a threshold per
    channel (RSign); this is that threshold, with the centre added back so the levels approximate
    x itself. `center` has one value per slice of `axis`, `scale` is one value. Gradients
    (straight-through, clipped to |x - c| <= scale): x gets 1 inside, the centre 1 outside, the
    scale LSQ's code - u inside (u = (x - c) / scale), scaled by 1 / sqrt(x.numel()).
    """
    if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):  # ONNX export traces this
        check_finite(x)
    axis = _axis(x, axis)
    shape = [1] * x.dim()
    shape[axis] = -1
    c = center.to(x.dtype).reshape(shape)
    s = scale.to(x.dtype)
    with torch.no_grad():
        code = centred_codes(x, c, s, ternary)
        y = c + s * code
    if not (x.requires_grad or center.requires_grad or scale.requires_grad):
        return y
    if scale.requires_grad:
        s = _scale_gradient(s, 1.0 / math.sqrt(max(x.numel(), 1)))
    u = (x - c) / s
    clipped = u.clamp(-1.0, 1.0)
    surrogate = c + s * (clipped - clipped.detach() + code)
    return y + (surrogate - surrogate.detach())


def centred_codes(x: Tensor, center: Tensor, scale: Tensor, ternary: bool) -> Tensor:
    """The codes of `centered_sign` (center already shaped to broadcast against x), in x's
    dtype: u = x - center; binary u >= 0 -> +1 else -1; ternary +1 where u > scale / 2, -1
    where u < -scale / 2, else 0. The bit kernels compute these comparisons in float32 too."""
    u = x - center
    if not ternary:
        return torch.where(u >= 0, 1.0, -1.0).to(x.dtype)
    half = scale * 0.5
    return (u > half).to(x.dtype) - (u < -half).to(x.dtype)


def _round(v: Tensor, spec: QuantSpec, generator: Rng) -> Tensor:
    if spec.rounding == "stochastic":
        noise = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device)
        return torch.floor(v + noise)
    return torch.round(v)  # half to even, as ONNX QuantizeLinear


class _RoundSTE(torch.autograd.Function):
    """Rounding whose gradient is the identity (the straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, v: Tensor, spec: QuantSpec, generator: Rng) -> Tensor:
        return _round(v, spec, generator)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        """The identity for `v`; the spec and generator take no gradient."""
        return grad, None, None


def _scale_gradient(t: Tensor, factor: float) -> Tensor:
    """Same value as `t` (bit for bit); its gradient is multiplied by `factor`."""
    scaled = t * factor
    return t.detach() + (scaled - scaled.detach())


def _log2_codes(x: Tensor, s: Tensor, spec: QuantSpec) -> Tensor:
    """Code m > 0 stands for s * 2^(m - levels); magnitudes are rounded in the log domain."""
    levels = spec.log2_levels
    exponent = torch.round(torch.log2(x.abs() / s))  # -inf for zeros, clamped to code 0 below
    magnitude = torch.clamp(exponent + levels, 0, levels)
    if not spec.signed:
        return torch.where(x > 0, magnitude, 0.0)
    return torch.sign(x) * magnitude


def _sign_codes(x: Tensor, spec: QuantSpec) -> Tensor:
    """Binary: the sign (0 counts as +1). Ternary: the sign where |x| passes the TWN threshold."""
    if spec.scheme == "binary":
        return torch.where(x >= 0, 1.0, -1.0)
    grouped = spec.granularity
    if isinstance(grouped, PerGroup):  # x is already grouped: reduce over the size axis
        rows_axis = grouped.axis % (x.dim() - 1) + 1
        threshold = TERNARY_THRESHOLD * x.abs().mean(rows_axis, keepdim=True)
    else:
        threshold = expand_param(reduce_by(x, grouped, _ternary_threshold_rows), x, grouped)
    return torch.sign(x) * (x.abs() > threshold)


def pack(q: Tensor, bits: int, *, signed: bool) -> Tensor:
    """Pack integer codes of 1, 2 or 4 bits into uint8 along the last dimension.

    The first element goes to the low-order bits (the ONNX INT4 layout). The last dimension is
    padded with zeros to a whole byte; `unpack` needs the original length back.
    """
    per_byte = _per_byte(bits)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"values outside [{lo}, {hi}] cannot be packed as {kind} {bits}-bit")
    codes = q.to(torch.int32) & (2**bits - 1)
    codes = torch.nn.functional.pad(codes, (0, (-q.shape[-1]) % per_byte))
    codes = codes.reshape(*q.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=q.device) * bits
    return (codes << shifts).sum(-1).to(torch.uint8)


def unpack(packed: Tensor, bits: int, length: int, *, signed: bool) -> Tensor:
    """Inverse of `pack`: int8 codes, last dimension cut back to `length`."""
    per_byte = _per_byte(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack expects a uint8 tensor, got {packed.dtype}")
    if not 0 <= length <= packed.shape[-1] * per_byte:
        raise ValueError(f"length {length} does not fit in {packed.shape[-1]} packed bytes")
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    codes = codes.flatten(-2)[..., :length]
    if signed:
        codes = torch.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes)
    return codes.to(torch.int8 if signed else torch.uint8)


def _per_byte(bits: int) -> int:
    if bits not in (1, 2, 4):
        raise ValueError(f"pack bits must be 1, 2 or 4, got {bits}")
    return 8 // bits


# Codes as stored: 4 bits and fewer packed into bytes, more in their own dtype


def packed_bits(spec: QuantSpec) -> int | None:
    """Bits per code in packed storage, or None when codes are stored in their own dtype."""
    if spec.scheme == "binary":
        return 1
    if spec.bits <= 2:
        return 2
    if spec.bits <= 4:
        return 4
    return None


def store_codes(q: Tensor, spec: QuantSpec) -> Tensor:
    """Codes as saved: packed uint8 (flattened) for 4 bits and fewer, else the storage dtype."""
    bits = packed_bits(spec)
    if bits is None:
        return q.to(spec.storage_dtype).contiguous()
    flat = q.reshape(-1)
    if spec.scheme == "binary":  # codes are -1 / +1: store the sign bit as 0 / 1
        return pack((flat > 0).to(torch.uint8), 1, signed=False)
    return pack(flat, bits, signed=spec.signed)


def stored_codes_layout(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[torch.Size, torch.dtype]:
    """Shape and dtype of `store_codes` for codes of `shape`, without computing them."""
    bits = packed_bits(spec)
    if bits is None:
        return torch.Size(shape), spec.storage_dtype
    per_byte = _per_byte(bits)
    return torch.Size([-(-math.prod(shape) // per_byte)]), torch.uint8


def load_codes(stored: Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> Tensor:
    """Inverse of `store_codes`: integer codes in their original shape."""
    bits = packed_bits(spec)
    if bits is None:
        return stored.reshape(shape)
    numel = math.prod(shape)
    if spec.scheme == "binary":
        sign = unpack(stored, 1, numel, signed=False)
        return (sign.to(torch.int8) * 2 - 1).reshape(shape)
    return unpack(stored, bits, numel, signed=spec.signed).reshape(shape)


def check_codes(codes: Tensor, spec: QuantSpec) -> None:
    """ValueError if integer codes (or zero points) fall outside [qmin, qmax] of `spec`."""
    if codes.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(codes))
    if lo < spec.qmin or hi > spec.qmax:
        raise ValueError(
            f"values in [{lo}, {hi}] are outside [{spec.qmin}, {spec.qmax}] of the "
            f"{spec.bits}-bit spec"
        )


def check_stored_codes(stored: Tensor, spec: QuantSpec) -> None:
    """`check_codes` on codes as `store_codes` wrote them, without unpacking them: each byte
    value present is decoded once."""
    if spec.scheme == "binary":
        return  # every bit pattern is a code, -1 or +1
    bits = packed_bits(spec)
    if bits is None:
        return check_codes(stored, spec)
    per_byte = _per_byte(bits)
    every_byte = torch.arange(256, dtype=torch.uint8)
    decoded = load_codes(every_byte, spec, (256 * per_byte,)).reshape(256, per_byte)
    present = torch.bincount(stored.reshape(-1), minlength=256).cpu() > 0
    check_codes(decoded[present], spec)
