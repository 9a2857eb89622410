"""Dynamic int8 Linear with one symmetric activation scale per token (per row of the input).

    s   = max|x_row| / qmax            (1 where that is zero or denormal, as `numerics.qparams`)
    q   = round_half_even(x / s)                      int8 codes, |q| <= qmax by construction
    acc = q @ w_q^T                                   int32, exact
    y   = acc * w_scale * s + bias                    float32

The codes are those of `numerics.quantize` with the per-token qparams of `numerics.tensor_qparams`
(same float32 division, never a multiplication by 1/s), so the result equals the simulation up
to float rounding of the final rescale. Three GEMM routes compute `acc * w_scale`; which one runs
depends on the shape (`choose_route`, measured in docs/kernels.md):

- "int_mm": `torch._int_mm` (oneDNN s8s8). Fastest for one token times a small weight; the
  fallback everywhere (correct on every CPU).
- "fbgemm": fbgemm's `linear_with_input_q_dq_qweight_dq_output_fp32` fed the codes as floats
  with input scale 1 and zero point 128, so its own quantization step is exact; the weight scale
  is fused into its output. Fastest for a few tokens.
- "onednn": oneDNN's `qlinear_pointwise` (the op inductor emits for int8 Linear) on uint8 codes
  (q + 128, zero point 128), weight scale fused. Fastest from `FUSE_MIN_TOKENS` rows on.

fbgemm and oneDNN multiply uint8 by int8; without VNNI (or AMX) their AVX2 / AVX-512 kernels add
pairs of products in saturating int16 (255 * 127 * 2 overflows), so they are used only on CPUs
with VNNI (`torch.cpu._is_vnni_supported`); elsewhere every call runs "int_mm". Their weights are
prepacked once per layer (`DynamicLinearWeights`), lazily per route, and never saved.

The per-row scale and the bias are one in-place pass over the output (`addcmul`). For one token
the scale is a Python float and the quantization three eager ops; from `FUSE_MIN_TOKENS` rows the
row max and the quantization are one `torch.compile`d pass.
"""

from __future__ import annotations

import struct
import warnings
from typing import Any, Literal

import torch
from torch import Tensor

from lowbit.kernels.compile import Compiled

Route = Literal["int_mm", "fbgemm", "onednn"]
ROUTES: tuple[Route, ...] = ("int_mm", "fbgemm", "onednn")

_TINY = torch.finfo(torch.float32).tiny
# From this many rows the compiled quantize pass and oneDNN pay off (below, a compiled call's
# overhead exceeds the passes it saves, and fbgemm's small-M GEMM is faster); decoding one token
# at a time never pays a compile.
FUSE_MIN_TOKENS = 32
# One token: `_int_mm`'s GEMV beats fbgemm's up to about this weight size (K * N), above it
# fbgemm's is faster (GEMM alone, 1 thread: 768x768 `_int_mm` 9 us, fbgemm 24 us; 4096x4096
# `_int_mm` 0.36-0.43 ms, fbgemm 0.27-0.29 ms).
GEMV_MAX_WEIGHT = 1 << 22


def u8_gemm_safe() -> bool:
    """True when this CPU's uint8 x int8 kernels (fbgemm, oneDNN) accumulate exactly (VNNI)."""
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(is_vnni is not None and is_vnni())


def choose_route(m: int, k: int, n: int, available: tuple[Route, ...]) -> Route:
    """The fastest route for an [m, k] x [k, n] product among `available` ("int_mm" always is)."""
    if m >= FUSE_MIN_TOKENS:
        want: Route = "onednn"
    elif m > 1 or k * n > GEMV_MAX_WEIGHT:
        want = "fbgemm"
    else:
        want = "int_mm"
    return want if want in available else "int_mm"


def quantize_per_token(x: Tensor, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """Int8 codes of a 2-D float32 `x` with one symmetric scale per row, and the [M, 1] scales."""
    q, scale = _float_codes(x, qmax)
    return q.to(torch.int8), scale


def _float_codes(x: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    # No clamp: with s = max|x_row| / qmax every |x / s| rounds to at most qmax.
    top = x.abs().amax(-1, keepdim=True)
    scale = top / qmax
    scale = torch.where(scale > _TINY, scale, 1.0)
    return torch.round(x / scale), scale


def _uint8_codes(x: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    q, scale = _float_codes(x, qmax)
    return (q + 128).to(torch.uint8), scale


def _int_mm_rescale(x: Tensor, w_t: Tensor, w_scale: Tensor, bias: Tensor, qmax: int) -> Tensor:
    q, scale = _float_codes(x, qmax)
    acc = torch._int_mm(q.to(torch.int8), w_t)
    return torch.addcmul(bias, acc.float().mul_(scale), w_scale)


_compiled_int_mm = Compiled(_int_mm_rescale)
_compiled_uint8_codes = Compiled(_uint8_codes)


def _f32(v: float) -> float:
    """`v` rounded to float32 (float32 division is the double one rounded once more)."""
    return struct.unpack("f", struct.pack("f", v))[0]


class DynamicLinearWeights:
    """The int8 weight of one Linear in each route's layout, packed on first use, never saved.

    codes: [N, K] int8 weight codes; w_scale: [N] float32; bias: [N] float32; routes: the
    routes this layer may use (default: "int_mm", plus fbgemm and oneDNN where `u8_gemm_safe`
    and this torch has them).
    """

    def __init__(
        self,
        codes: Tensor,
        w_scale: Tensor,
        bias: Tensor,
        qmax: int = 127,
        routes: tuple[Route, ...] | None = None,
    ) -> None:
        self.codes = codes.to(torch.int8).contiguous()
        self.w_t = self.codes.t()
        self.w_scale = w_scale.float().expand(self.codes.shape[0]).contiguous()
        self.bias = bias.float().contiguous()
        self.w_zero = torch.zeros(self.w_scale.shape, dtype=torch.int64)
        self.qmax = qmax
        if routes is None:
            routes = ROUTES if u8_gemm_safe() else ("int_mm",)
        self.routes = routes
        k, n = self.w_t.shape
        self.one_token_route = choose_route(1, k, n, routes)
        self._fbgemm: Any = None
        self._onednn: Tensor | None = None

    def fbgemm(self) -> Any:
        """fbgemm's packed weight (per-channel qint8, no bias); None where it cannot be built."""
        if self._fbgemm is None and "fbgemm" in self.routes:
            self._fbgemm = _fbgemm_pack(self.codes, self.w_scale)
            if self._fbgemm is None:
                self.routes = tuple(r for r in self.routes if r != "fbgemm")
        return self._fbgemm

    def onednn(self) -> Tensor | None:
        """oneDNN's packed weight; None where it cannot be built."""
        if self._onednn is None and "onednn" in self.routes:
            try:
                self._onednn = torch.ops.onednn.qlinear_prepack(self.codes, None)
            except (AttributeError, RuntimeError):
                self.routes = tuple(r for r in self.routes if r != "onednn")
        return self._onednn


def _fbgemm_pack(codes: Tensor, w_scale: Tensor) -> Any:
    op = "linear_with_input_q_dq_qweight_dq_output_fp32"
    if "fbgemm" not in torch.backends.quantized.supported_engines or not hasattr(
        torch.ops.quantized, op
    ):
        return None
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():  # quantized tensors are deprecated; the op is not gone
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                codes, w_scale.double(), torch.zeros(len(w_scale), dtype=torch.int64), 0
            )
            return torch.ops.quantized.linear_prepack(qw, None)
    except (AttributeError, RuntimeError):
        return None
    finally:
        torch.backends.quantized.engine = engine


def dynamic_int8_linear(
    x: Tensor, weights: DynamicLinearWeights, route: Route | None = None
) -> Tensor:
    """y = per-token-int8(x) @ w^T * scales + bias for 2-D float32 `x` [M, K] on the CPU.

    route: force one route (tests run each); by default `choose_route` picks per shape.
    Not differentiable (integer codes): the output never requires grad.
    """
    if x.requires_grad:
        x = x.detach()
    m, k = x.shape
    if m == 1 and route is None and k:  # decoding: the hot path
        return _one_token(x, weights, weights.one_token_route)
    n = weights.codes.shape[0]
    if m == 0 or k == 0:
        return weights.bias.expand(m, n).clone()
    if route is None:
        route = choose_route(m, k, n, weights.routes)
    if m == 1 and route != "onednn":
        return _one_token(x, weights, route)
    if route == "fbgemm" and (packed := weights.fbgemm()) is not None:
        q, scale = _float_codes(x, weights.qmax)
        y = _fbgemm_mm(q, packed)
    elif route == "onednn" and (packed := weights.onednn()) is not None:
        quantize = _compiled_uint8_codes if m >= FUSE_MIN_TOKENS else _uint8_codes
        q, scale = quantize(x, weights.qmax)
        y = torch.ops.onednn.qlinear_pointwise(
            q,
            1.0,
            128,
            packed,
            weights.w_scale,
            weights.w_zero,
            None,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )  # acc * w_scale from uint8 codes (q + 128, zero point 128)
    elif m >= FUSE_MIN_TOKENS:
        return _compiled_int_mm(x, weights.w_t, weights.w_scale, weights.bias, weights.qmax)
    else:
        return _int_mm_rescale(x, weights.w_t, weights.w_scale, weights.bias, weights.qmax)
    return torch.addcmul(weights.bias, y, scale, out=y)


def _one_token(x: Tensor, weights: DynamicLinearWeights, route: Route) -> Tensor:
    """One row: the scale as a Python float, so quantize + GEMM + rescale are 6-7 eager ops."""
    lo, hi = torch.aminmax(x)  # one op fewer than x.abs().max()
    s = _f32(max(-float(lo), float(hi)) / weights.qmax)
    if not s > _TINY:
        s = 1.0
    q = (x / s).round_()  # true float32 division by s, as the simulation
    if route == "fbgemm" and (packed := weights.fbgemm()) is not None:
        y = _fbgemm_mm(q, packed)
        return torch.add(weights.bias, y, alpha=s, out=y)
    acc = torch._int_mm(q.to(torch.int8), weights.w_t)
    return torch.addcmul(weights.bias, acc, weights.w_scale, value=s)


def _fbgemm_mm(q: Tensor, packed: Any) -> Tensor:
    """acc * w_scale from float codes: fbgemm quantizes them with scale 1, zero point 128."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(q, 1.0, 128, packed)
