"""Binary and ternary kernels on bits (`kernels/csrc/binary.cpp`), each with an eager twin.

Codes of +-1 (binary) or -1 / 0 / +1 (ternary) are stored as bit rows along the reduction axis:
64 codes per int64 word, code k in bit k % 64 of word k // 64, bits past K zero. A binary row is
one plane (bit 1: +1); a ternary row two, sign (bit 1: +1) and nonzero.

- `popcount_dots`: integer dot products of bit rows with a weight on bits. XNOR (binary x binary)
  `K - 2 * popcount(a ^ w)`; ternary x ternary `popcount(m) - 2 * popcount(m & (a ^ w))` with
  m the AND of the nonzero planes. AVX-512 VPOPCNTDQ, AVX2 or plain C++ (`isa`: 0 the best this
  CPU has, 1 AVX2, 2 plain, 3 AVX-512), chosen at run time.
- `sign_mask_sums`: a binary / ternary weight on bits times float32 or int8 rows: the inputs
  added with the weight's sign (BWN, TWN); int8 inputs sum exactly in int32.
- `sign_bits`, `sign_bits_conv`: bits of (x - center >= 0) per row, or as a convolution's
  bit im2col (padding counted as +1; the caller subtracts what it adds); `ternary_bits`: the
  two planes of ternary codes around a centre (+1 above center + t, -1 below center - t).
- `xnor_conv`, `ternary_conv`: a binary / ternary Conv2d from float input to float output, the
  input coded into a padded bit image (NCHW read directly) and the popcount GEMM reading it in
  place (`kernels/csrc/binary_conv.cpp`).

The eager twins (used where the C++ kernels are not built) compute the same integers by
unpacking the bits and multiplying in float64; float sums differ from the C++ ones by rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.kernels import native

BLOCK = 32  # weight rows per interleaved block of the popcount GEMM
_EMPTY = torch.empty(0, dtype=torch.int64)


def _ops() -> Any | None:
    return native.ops()


def words(k: int) -> int:
    """int64 words per bit row of k codes."""
    return (k + 63) // 64


def pack_bits(bits: Tensor) -> Tensor:
    """bool / 0-1 [..., K] -> int64 [..., ceil(K / 64)], element k in bit k % 64 of word k // 64."""
    k = bits.shape[-1]
    padded = F.pad(bits.to(torch.uint8), (0, words(k) * 64 - k))
    octets = padded.reshape(*bits.shape[:-1], words(k) * 8, 8).to(torch.int32)
    shifts = torch.arange(8, dtype=torch.int32, device=bits.device)
    packed = (octets << shifts).sum(-1).to(torch.uint8).contiguous()
    return packed.view(torch.int64)  # little-endian: byte b holds bits 8b..8b+7


def unpack_bits(packed: Tensor, k: int) -> Tensor:
    """Inverse of `pack_bits`: bool [..., k]."""
    octets = packed.contiguous().view(torch.uint8).to(torch.int32)
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = ((octets.unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], packed.shape[-1] * 64)
    return bits[..., :k].bool()


def block_rows(rows: Tensor) -> Tensor:
    """Weight bit rows [N, W] -> the popcount GEMM's layout [ceil(N / 32), W, 32] (zero rows
    fill the last block)."""
    n, w = rows.shape
    blocks = -(-n // BLOCK)
    padded = F.pad(rows, (0, 0, 0, blocks * BLOCK - n))
    return padded.reshape(blocks, BLOCK, w).transpose(1, 2).contiguous()


def _unblock(blocked: Tensor, n: int) -> Tensor:
    return blocked.transpose(1, 2).reshape(-1, blocked.shape[1])[:n]


def sign_bits(x: Tensor, center: Tensor | None = None) -> Tensor:
    """Bits of (x - center >= 0) for each row of x [M, K] (center [K] or None for 0)."""
    c = _EMPTY.float() if center is None else center.float()
    ops = _ops()
    if ops is not None and x.is_cpu:
        return ops.sign_bits(x.float(), c)
    v = x.float() if center is None else x.float() - c
    return pack_bits(v >= 0)


def ternary_bits(
    x: Tensor, center: Tensor | None, threshold: float, isa: int = 0
) -> tuple[Tensor, Tensor]:
    """The sign (u > t) and nonzero (|u| > t) planes of each row of x [M, K], u = x - center
    (center [K] or None for 0), t = threshold, compared in float32: the codes of
    `numerics.centred_codes` with scale 2 t."""
    c = _EMPTY.float() if center is None else center.float()
    ops = _ops()
    if ops is not None and x.is_cpu:
        return ops.ternary_bits(x.float(), c, threshold, isa)
    u = x.float() if center is None else x.float() - c
    t = torch.tensor(threshold, dtype=torch.float32)
    return pack_bits(u > t), pack_bits(u.abs() > t)


def sign_bits_conv(
    x: Tensor,
    center: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """A Conv2d's bit im2col: [B * Ho * Wo, kh * kw * words(C)], taps in the weight's (kh, kw)
    order, each tap's channel bits in its own words; padded pixels are +1 in every channel."""
    ops = _ops()
    if ops is not None and x.is_cpu:
        return ops.sign_bits_conv(x.float(), center.float(), *kernel, *stride, *padding, *dilation)
    b, c = x.shape[:2]
    bits = (x.float() - center.float().reshape(1, -1, 1, 1) >= 0).float()
    pads = (padding[1], padding[1], padding[0], padding[0])
    cols = F.unfold(F.pad(bits, pads, value=1.0), kernel, dilation=dilation, stride=stride)
    taps = kernel[0] * kernel[1]
    cols = cols.reshape(b, c, taps, cols.shape[-1]).permute(0, 3, 2, 1)  # [B, L, taps, C]
    return pack_bits(cols > 0.5).reshape(-1, taps * words(c))


def xnor_conv(
    x: Tensor,
    center: Tensor,
    w_blocked: Tensor,
    n: int,
    geometry: tuple[tuple[int, int], ...],
    scale: Tensor,
    maps: tuple[Tensor, Tensor, Tensor],
    isa: int = 0,
) -> Tensor:
    """An XNOR Conv2d's float32 output [B * Ho * Wo, n] (channels-last rows), straight from
    the bits of x [B, C, H, W] (NCHW or channels-last): (dot - corr[u]) * scale + offset[u],
    u = cls[position]. geometry: kernel, stride, padding, dilation; maps: corr [U, n] int32,
    offset [U, n], cls [Ho * Wo] (the classes of output positions, by the padded taps they see)."""
    corr, offset, cls = maps
    kernel, stride, padding, dilation = geometry
    ops = _ops()
    if ops is not None and x.is_cpu:
        flat = (*kernel, *stride, *padding, *dilation)
        return ops.bits_conv(
            x.float(), center.float(), 0.0, w_blocked, _EMPTY, n, *flat, scale, corr, offset,
            cls, isa,
        )  # fmt: skip
    bits = sign_bits_conv(x, center, kernel, stride, padding, dilation)
    k = x.shape[1] * kernel[0] * kernel[1]
    return popcount_affine(bits, w_blocked, n, k, scale, offset[cls], corr[cls])


def ternary_conv(
    x: Tensor,
    center: Tensor,
    threshold: float,
    planes: tuple[Tensor, Tensor],
    n: int,
    geometry: tuple[tuple[int, int], ...],
    scale: Tensor,
    maps: tuple[Tensor, Tensor],
    isa: int = 0,
) -> Tensor:
    """A zero-padded Conv2d of the ternary codes of x [B, C, H, W] around center (as
    `ternary_bits`) with a ternary weight's blocked planes (sign, nonzero; taps in the weight's
    (kh, kw) order, each tap's channels in their own words), float32 [B * Ho * Wo, n]:
    dot * scale + offset[u], u = cls[position]; maps: offset [U, n], cls [Ho * Wo]. Padding is
    code 0 and adds nothing; the C++ kernel codes x itself (no ternary tensor in between)."""
    offset, cls = maps
    kernel, stride, padding, dilation = geometry
    ops = _ops()
    if ops is not None and x.is_cpu:
        flat = (*kernel, *stride, *padding, *dilation)
        return ops.bits_conv(
            x.float(), center.float(), threshold, *planes, n, *flat, scale,
            _EMPTY.to(torch.int32), offset, cls, isa,
        )  # fmt: skip
    b, c = x.shape[:2]
    u = x.float() - center.float().reshape(1, -1, 1, 1)
    t = torch.tensor(threshold, dtype=torch.float32)
    codes = (u > t).double() - (u < -t).double()
    taps = kernel[0] * kernel[1]
    weight = _codes(_unblock(planes[0], n), _unblock(planes[1], n), taps * words(c) * 64)
    weight = weight.reshape(n, taps, -1)[..., :c].reshape(n, *kernel, c).permute(0, 3, 1, 2)
    dots = F.conv2d(codes, weight, None, stride, padding, dilation).round()
    dots = dots.permute(0, 2, 3, 1).reshape(b, cls.numel(), n).float()
    return torch.addcmul(offset[cls.long()], dots, scale).reshape(-1, n)


def popcount_dots(
    a: Tensor,
    w_blocked: Tensor,
    n: int,
    k: int,
    a_nonzero: Tensor | None = None,
    w_nonzero: Tensor | None = None,
    isa: int = 0,
) -> Tensor:
    """int32 [M, n]: XNOR dots of sign bit rows a [M, W] with a blocked binary weight, or with
    the nonzero planes given, ternary dots."""
    ternary = a_nonzero is not None
    if ternary != (w_nonzero is not None):
        raise ValueError("popcount_dots: give the nonzero planes of both operands, or neither")
    ops = _ops()
    if ops is not None and a.is_cpu:
        an = a_nonzero if a_nonzero is not None else _EMPTY
        wn = w_nonzero if w_nonzero is not None else _EMPTY
        return ops.popcount_dots(a, an, w_blocked, wn, n, k, isa)
    return _popcount_dots_eager(a, w_blocked, n, k, a_nonzero, w_nonzero)


def popcount_affine(
    a: Tensor,
    w_blocked: Tensor,
    n: int,
    k: int,
    scale: Tensor,
    offset: Tensor,
    corr: Tensor | None = None,
    isa: int = 0,
    nonzero: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """A binary or ternary layer's float32 output in one pass: (dot - corr) * scale + offset,
    with offset and corr [L, n] repeating over the rows (L rows per image of a convolution, 1
    for a Linear), scale [n]; XNOR dots, or with `nonzero` (the input's and the weight's
    nonzero planes), ternary ones."""
    a_nz, w_nz = nonzero if nonzero is not None else (None, None)
    ops = _ops()
    if ops is not None and a.is_cpu:
        c = corr if corr is not None else _EMPTY.to(torch.int32)
        an = a_nz if a_nz is not None else _EMPTY
        wn = w_nz if w_nz is not None else _EMPTY
        return ops.popcount_affine(a, an, w_blocked, wn, n, k, c, scale, offset, isa)
    dots = popcount_dots(a, w_blocked, n, k, a_nz, w_nz).reshape(-1, offset.shape[0], n)
    if corr is not None:
        dots = dots - corr
    return torch.addcmul(offset, dots.float(), scale).reshape(-1, n)


def _popcount_dots_eager(
    a: Tensor, w_blocked: Tensor, n: int, k: int, a_nonzero: Tensor | None, w_nonzero: Tensor | None
) -> Tensor:
    """The popcount formulas over every bit of the rows (as the C++ kernel counts them), in
    float64 products of 0 / 1 bits: popcount(a ^ w) = |a| + |w| - 2 a.w."""
    width = a.shape[1] * 64
    bits_a = unpack_bits(a, width).double()
    bits_w = unpack_bits(_unblock(w_blocked, n), width).double()
    if a_nonzero is None or w_nonzero is None:
        differ = bits_a.sum(1, keepdim=True) + bits_w.sum(1) - 2 * bits_a @ bits_w.t()
        return (k - 2 * differ).to(torch.int32)
    nz_a = unpack_bits(a_nonzero, width).double()
    nz_w = unpack_bits(_unblock(w_nonzero, n), width).double()
    both = nz_a @ nz_w.t()  # popcount(m)
    differ = (nz_a * bits_a) @ nz_w.t() + nz_a @ (nz_w * bits_w).t()
    differ -= 2 * (nz_a * bits_a) @ (nz_w * bits_w).t()  # popcount(m & (a ^ w))
    return (both - 2 * differ).to(torch.int32)


def sign_mask_sums(x: Tensor, sign: Tensor, nonzero: Tensor | None = None, isa: int = 0) -> Tensor:
    """x [M, K] (float32 or int8) times a binary / ternary weight on bits [N, W]: float32
    [M, N] for float x, int32 (exact) for int8 x."""
    ops = _ops()
    if ops is not None and x.is_cpu:
        nz = nonzero if nonzero is not None else _EMPTY
        return ops.sign_mask_sums(x.contiguous(), sign, nz, isa)
    w = _codes(sign, nonzero, x.shape[1])
    if x.dtype == torch.int8:
        return (x.double() @ w.t()).to(torch.int32)
    return x.float() @ w.float().t()


def _codes(sign: Tensor, nonzero: Tensor | None, k: int) -> Tensor:
    """float64 codes (+-1, or 0 where nonzero is clear) of bit rows."""
    codes = unpack_bits(sign, k).double() * 2 - 1
    return codes if nonzero is None else codes * unpack_bits(nonzero, k).double()


def isa_levels() -> list[int]:
    """The `isa` values this CPU runs (for tests): 2 (plain C++) always, 1 AVX2, 3 AVX-512."""
    levels = [2]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        levels.append(1)
    if _has_vpopcntdq():
        levels.append(3)
    return levels


def _has_vpopcntdq() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            return "avx512_vpopcntdq" in info.read()
    except OSError:
        return False
