"""Dynamic int8 Linear with one symmetric activation scale per token (per row of the input).

    s   = max|x_row| / qmax            (1 where that is zero or denormal, as `numerics.qparams`)
    q   = round_half_even(x / s)                      int8 codes, |q| <= qmax by construction
    acc = q @ w_q^T                                   int32, exact
    y   = acc * w_scale * s + bias                    float32

The codes are those of `numerics.quantize` with the per-token qparams of `numerics.tensor_qparams`
(same float32 division, never a multiplication by 1/s), so the result equals the simulation up
to float rounding of the final rescale. Four GEMM routes compute `acc`; which one runs depends on
the shape (`choose_route`, measured in docs/kernels.md):

- "vnni": lowbit's own AVX-512 VNNI kernel (`kernels/csrc`), uint8 codes (q + 128) times the
  int8 weight in its own layout, the offset removed exactly. Fastest below `ONEDNN_MIN_ROWS`
  tokens (decoding, short batches).
- "int_mm": `torch._int_mm` (oneDNN s8s8). The fallback everywhere; exact on every CPU through
  `int_mm_operand` (the weight split in two halves where oneDNN's GEMM would saturate).
- "fbgemm": fbgemm's `linear_with_input_q_dq_qweight_dq_output_fp32` fed the codes as floats
  with input scale 1 and zero point 128, so its own quantization step is exact; the weight scale
  is fused into its output. For 2-31 tokens where the VNNI kernel is not built.
- "onednn": oneDNN's `qlinear_pointwise` (the op inductor emits for int8 Linear) on uint8 codes
  (q + 128, zero point 128), weight scale fused. Fastest from `ONEDNN_MIN_ROWS` rows on.

Each route is one fused C++ op of `kernels.native` (quantize pass, GEMM, rescale pass); where
those are not built (no compiler, compiling switched off) the same routes run as eager torch ops,
with the same codes, and "vnni" is replaced by the next best. Inside a graph that the user
compiles, "int_mm" as torch ops, which inductor lowers and fuses.

"vnni", fbgemm and oneDNN multiply uint8 by int8; without VNNI (or AMX) the AVX2 / AVX-512
kernels of fbgemm and oneDNN add pairs of products in saturating int16 (255 * 127 * 2
overflows), so they are used only on CPUs with VNNI (`torch.cpu._is_vnni_supported`); elsewhere
every call runs "int_mm". Weights are prepacked once per layer and route
(`DynamicLinearWeights`), lazily, and never saved.
"""

from __future__ import annotations

import platform
import warnings
from typing import Any, Literal

import torch
from torch import Tensor

from lowbit.kernels import native

Route = Literal["vnni", "int_mm", "fbgemm", "onednn"]
ROUTES: tuple[Route, ...] = ("vnni", "int_mm", "fbgemm", "onednn")

_TINY = torch.finfo(torch.float32).tiny
# From this many rows oneDNN's GEMM is the fastest; below, lowbit's VNNI kernel (docs/kernels.md).
ONEDNN_MIN_ROWS = 32
# Without the VNNI kernel: one token times a weight of up to this many elements (K * N) runs
# `_int_mm`, larger ones and 2-31 tokens fbgemm.
SMALL_WEIGHT = 1 << 22
_int_mm_exact: list[bool] = []  # `int_mm_exact_here`, once known


def u8_gemm_safe() -> bool:
    """True when this CPU's uint8 x int8 kernels (fbgemm, oneDNN) accumulate exactly: VNNI, and
    oneDNN using it (`ONEDNN_MAX_CPU_ISA` can cap it below)."""
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(is_vnni is not None and is_vnni()) and int_mm_exact_here()


@torch.compiler.disable  # a probe run once, eagerly, not a graph to trace
def int_mm_exact_here() -> bool:
    """Whether `torch._int_mm` sums full-range int8 products exactly on this CPU.

    oneDNN's s8 x s8 GEMM shifts the left operand to uint8; without VNNI or AMX (AVX2, AVX-512
    without VNNI) it adds pairs of products in saturating int16, and 255 * 127 * 2 > 32767 (an
    int32 sum off by up to 2^15). Checked once on that worst case, so it holds whatever kernel
    oneDNN picks."""
    if not _int_mm_exact:
        a = torch.tensor([[127, 127], [-128, -128]], dtype=torch.int8)
        w = torch.tensor([[127, 127], [-127, -127]], dtype=torch.int8)
        _int_mm_exact.append(torch.equal(torch._int_mm(a, w.t()), a.int() @ w.int().t()))
    return _int_mm_exact[0]


def int_mm_operand(codes: Tensor) -> Tensor:
    """The right operand of `int_mm` for int8 weight codes [N, K]: codes^T [K, N] where
    `torch._int_mm` is exact, else [K, 2N], the two halves floor(w / 2) and w - floor(w / 2),
    each within [-64, 64], so a pair of products stays within 255 * 64 * 2 < 2^15."""
    if codes.device.type != "cpu" or int_mm_exact_here():
        return codes.t()
    half = torch.div(codes, 2, rounding_mode="floor")
    return torch.cat([half, codes - half]).t()


def int_mm(a: Tensor, operand: Tensor, n: int) -> Tensor:
    """a [M, K] int8 times `int_mm_operand` of an [n, K] weight -> [M, n] int32, exact."""
    acc = torch._int_mm(a, operand)
    return acc if operand.shape[1] == n else acc[:, :n] + acc[:, n:]


def choose_route(m: int, k: int, n: int, available: tuple[Route, ...], native_ops: bool) -> Route:
    """The fastest route for an [m, k] x [k, n] product among `available` ("int_mm" always is);
    native_ops: whether the C++ kernels are built ("vnni" needs them)."""
    if m >= ONEDNN_MIN_ROWS:
        want: Route = "onednn"
    elif native_ops and "vnni" in available:
        want = "vnni"
    elif m > 1 or k * n > SMALL_WEIGHT:
        want = "fbgemm"
    else:
        want = "int_mm"
    return want if want in available else "int_mm"


def quantize_per_token(x: Tensor, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """Int8 codes of a 2-D float32 `x` with one symmetric scale per row, and the [M, 1] scales."""
    q, scale = _float_codes(x, qmax)
    return q.to(torch.int8), scale


def _float_codes(x: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    # No clamp: with s = max|x_row| / qmax every |x / s| rounds to at most qmax. A row holding
    # a NaN or an infinity keeps a non-finite scale, so its output row is not finite either.
    top = x.abs().amax(-1, keepdim=True)
    scale = top / qmax
    scale = torch.where(scale <= _TINY, 1.0, scale)
    return torch.round(x / scale), scale


class DynamicLinearWeights:
    """The int8 weight of one Linear in each route's layout, packed on first use, never saved.

    codes: [N, K] int8 weight codes; w_scale: [N] float32; bias: [N] float32; routes: the
    routes this layer may use (default: "int_mm", plus "vnni", fbgemm and oneDNN where
    `u8_gemm_safe` and this build has them).
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
        self.w_t = int_mm_operand(self.codes)
        self.w_scale = w_scale.float().expand(self.codes.shape[0]).contiguous()
        self.bias = bias.float().contiguous()
        self.w_zero = torch.zeros(self.w_scale.shape, dtype=torch.int64)
        self.qmax = qmax
        if routes is None:
            routes = default_routes()
        self.routes = routes
        self._vnni: list[Tensor] | None = None
        self._fbgemm: Any = None
        self._onednn: Tensor | None = None

    def vnni(self, ops: Any) -> list[Tensor] | None:
        """The VNNI kernel's packed weight and offsets; None where it cannot be built."""
        if self._vnni is None and "vnni" in self.routes:
            try:
                self._vnni = ops.vnni_pack(self.codes)
            except RuntimeError:  # K too large for int32 sums
                self.routes = tuple(r for r in self.routes if r != "vnni")
        return self._vnni

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


def vnni_kernel_cpu() -> bool:
    """True when lowbit's own VNNI kernel (`kernels/csrc`) can run here: x86 with VNNI."""
    return u8_gemm_safe() and platform.machine().lower() in ("x86_64", "amd64")


def default_routes() -> tuple[Route, ...]:
    """The routes a dynamic int8 Linear may take on this CPU: only exact ones."""
    if not u8_gemm_safe():
        return ("int_mm",)
    return ROUTES if vnni_kernel_cpu() else ("int_mm", "fbgemm", "onednn")


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

    route: force one route (tests run each); by default `choose_route` picks per shape. A route
    this layer cannot run falls back to "int_mm".
    Not differentiable (integer codes): the output never requires grad.
    """
    if x.requires_grad:
        x = x.detach()
    m, k = x.shape
    n = weights.codes.shape[0]
    if m == 0 or k == 0:
        return weights.bias.expand(m, n).clone()
    if torch.compiler.is_compiling():
        # Inside a graph the user compiles: inductor lowers `_int_mm` and fuses the passes
        # around it (its oneDNN lowering needs frozen weights, fbgemm's packs are opaque).
        return _eager(x, weights, "int_mm")
    ops = native.ops()
    if route is None or (route == "vnni" and ops is None):
        route = choose_route(m, k, n, weights.routes, ops is not None)
    if ops is not None:
        return _native(ops, x, weights, route)
    return _eager(x, weights, route)


def _native(ops: Any, x: Tensor, w: DynamicLinearWeights, route: Route) -> Tensor:
    if route == "vnni" and (vnni := w.vnni(ops)) is not None:
        return ops.linear_vnni(x, vnni[0], vnni[1], w.w_scale, w.bias, w.qmax)
    if route == "fbgemm" and (packed := w.fbgemm()) is not None:
        return ops.linear_fbgemm(x, packed, w.bias, w.qmax)
    if route == "onednn" and (packed := w.onednn()) is not None:
        return ops.linear_onednn(x, packed, w.w_scale, w.w_zero, w.bias, w.qmax)
    return ops.linear_int_mm(x, w.w_t, w.w_scale, w.bias, w.qmax)


def _eager(x: Tensor, w: DynamicLinearWeights, route: Route) -> Tensor:
    """The native ops' computation as torch ops (same codes; a few more passes over memory)."""
    q, scale = _float_codes(x, w.qmax)
    if route == "fbgemm" and (packed := w.fbgemm()) is not None:
        # acc * w_scale from float codes: fbgemm quantizes them with scale 1, zero point 128
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(q, 1.0, 128, packed)
    elif route == "onednn" and (packed := w.onednn()) is not None:
        y = torch.ops.onednn.qlinear_pointwise(
            (q + 128).to(torch.uint8),
            1.0,
            128,
            packed,
            w.w_scale,
            w.w_zero,
            None,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )  # acc * w_scale from uint8 codes (q + 128, zero point 128)
    else:
        acc = int_mm(q.to(torch.int8), w.w_t, len(w.w_scale))
        return torch.addcmul(w.bias, acc.float().mul_(scale), w.w_scale)
    return torch.addcmul(w.bias, y, scale, out=y)
