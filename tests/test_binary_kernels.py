"""The bit kernels (`lowbit.kernels.binary`) against integer products computed from the codes,
on every instruction set this CPU runs, on odd sizes, one row and no rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit import kernels, numerics
from lowbit.kernels import binary, native

# K not a multiple of 64 nor 512, N not of 16 or 32, one row, no rows
SHAPES = [(5, 100, 19), (1, 577, 33), (0, 70, 8), (9, 1024, 50), (3, 1, 1)]
# -1: the eager twins (C++ kernels switched off); then each instruction set this CPU runs
ISAS = [-1, *binary.isa_levels()]
CONV_CASES = [
    (2, 70, (5, 6), 37, ((3, 3), (2, 1), (1, 1), (1, 1))),  # 2 channel words, N % 32
    (1, 3, (9, 70), 5, ((3, 2), (1, 1), (2, 0), (2, 1))),  # a row wider than 64 pixels
    (0, 64, (4, 4), 8, ((3, 3), (1, 1), (1, 1), (1, 1))),  # an empty batch
]


@pytest.fixture
def isa(request, monkeypatch):
    """Switches lowbit's C++ kernels on for an instruction set, off for the eager twins."""
    monkeypatch.setitem(kernels.compile._state, "enabled", request.param >= 0)
    if request.param >= 0 and native.ops() is None:
        pytest.skip("lowbit's C++ kernels are not built here")
    return max(request.param, 0)


def _codes(m: int, k: int, g: torch.Generator, ternary: bool = False) -> torch.Tensor:
    if ternary:
        return torch.randint(-1, 2, (m, k), generator=g)
    return torch.randint(0, 2, (m, k), generator=g) * 2 - 1


def _planes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return binary.pack_bits(codes > 0), binary.pack_bits(codes != 0)


def test_pack_bits_round_trips_and_puts_element_k_in_bit_k():
    bits = torch.zeros(2, 130, dtype=torch.bool)
    bits[0, 0] = bits[0, 65] = bits[1, 129] = True
    packed = binary.pack_bits(bits)
    assert packed.shape == (2, 3) and packed.dtype == torch.int64
    assert packed[0].tolist() == [1, 2, 0] and packed[1].tolist() == [0, 0, 2]
    assert torch.equal(binary.unpack_bits(packed, 130), bits)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_xnor_and_ternary_dots_are_exact(isa, m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    a, w = _codes(m, k, g), _codes(n, k, g)
    a_bits = binary.sign_bits(a.float())
    assert torch.equal(a_bits, binary.pack_bits(a > 0))
    w_bits = binary.block_rows(binary.pack_bits(w > 0))
    dots = binary.popcount_dots(a_bits, w_bits, n, k, isa=isa)
    assert dots.dtype == torch.int32 and dots.shape == (m, n)
    assert torch.equal(dots.long(), a @ w.t())
    at, wt = _codes(m, k, g, ternary=True), _codes(n, k, g, ternary=True)
    (a_s, a_nz), (w_s, w_nz) = _planes(at), _planes(wt)
    blocked = binary.block_rows(w_s), binary.block_rows(w_nz)
    dots = binary.popcount_dots(a_s, blocked[0], n, k, a_nz, blocked[1], isa=isa)
    assert torch.equal(dots.long(), at @ wt.t())


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_sign_mask_sums_int8_exact_and_float_close(isa, m, k, n):
    g = torch.Generator().manual_seed(k + n)
    for ternary in (False, True):
        w = _codes(n, k, g, ternary)
        sign, nonzero = _planes(w)
        nonzero = nonzero if ternary else None
        x8 = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        got = binary.sign_mask_sums(x8, sign, nonzero, isa)
        assert got.dtype == torch.int32 and torch.equal(got.long(), x8.long() @ w.t())
        x = torch.randn(m, k, generator=g)
        want = x.double() @ w.double().t()
        assert torch.allclose(
            binary.sign_mask_sums(x, sign, nonzero, isa).double(), want, atol=1e-4
        )


@pytest.mark.parametrize("isa", [-1, 0], indirect=True)
def test_sign_bits_conv_is_the_bit_im2col_with_padding_as_plus_one(isa):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 70, 5, 6, generator=g)
    center = torch.randn(70, generator=g) * 0.1
    got = binary.sign_bits_conv(x, center, (3, 3), (2, 1), (1, 1), (1, 1))
    signs = torch.where(x - center.reshape(1, -1, 1, 1) >= 0, 1.0, -1.0)
    cols = F.unfold(F.pad(signs, (1, 1, 1, 1), value=1.0), (3, 3), stride=(2, 1))
    cols = cols.reshape(2, 70, 9, -1).permute(0, 3, 2, 1).reshape(-1, 9, 70)
    assert got.shape == (cols.shape[0], 9 * 2)
    unpacked = binary.unpack_bits(got.reshape(-1, 9, 2), 128)[..., :70]
    assert torch.equal(unpacked, cols > 0)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_popcount_affine_is_the_dots_rescaled_per_row_of_an_image(isa):
    g = torch.Generator().manual_seed(5)
    m, k, n, rows_per_image = 12, 150, 37, 4
    a, w = _codes(m, k, g), _codes(n, k, g)
    corr = torch.randint(-9, 9, (rows_per_image, n), generator=g, dtype=torch.int32)
    scale, offset = torch.rand(n, generator=g), torch.randn(rows_per_image, n, generator=g)
    blocked = binary.block_rows(binary.pack_bits(w > 0))
    got = binary.popcount_affine(binary.pack_bits(a > 0), blocked, n, k, scale, offset, corr, isa)
    dots = (a @ w.t()).reshape(-1, rows_per_image, n) - corr
    want = (dots.double() * scale.double() + offset.double()).reshape(m, n)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("b,c,hw,n,geometry", CONV_CASES)
def test_xnor_conv_reads_the_bit_image_as_the_im2col_does(isa, b, c, hw, n, geometry):
    """The direct convolution (NCHW and channels-last inputs) is the integer formula on the
    +1-padded signs, rescaled with the maps of each position's class."""
    g = torch.Generator().manual_seed(c + n)
    x = torch.randn(b, c, *hw, generator=g)
    center = torch.randn(c, generator=g) * 0.1
    kernel, stride, padding, dilation = geometry
    w = _codes(n, c * kernel[0] * kernel[1], g).reshape(n, c, *kernel)
    taps = binary.pack_bits(w.permute(0, 2, 3, 1).reshape(n, -1, c) > 0).reshape(n, -1)
    blocked = binary.block_rows(taps)
    signs = torch.where(x - center.reshape(1, -1, 1, 1) >= 0, 1.0, -1.0).double()
    pads = (padding[1], padding[1], padding[0], padding[0])
    dots = F.conv2d(F.pad(signs, pads, value=1.0), w.double(), None, stride, 0, dilation)
    period = dots.shape[2] * dots.shape[3]
    cls = torch.randint(0, 3, (period,), generator=g, dtype=torch.int32)
    corr = torch.randint(-9, 9, (3, n), generator=g, dtype=torch.int32)
    scale, offset = torch.rand(n, generator=g), torch.randn(3, n, generator=g)
    dots = dots.permute(0, 2, 3, 1).reshape(b, period, n) - corr[cls.long()]
    want = (dots * scale.double() + offset[cls.long()].double()).reshape(-1, n)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        got = binary.xnor_conv(inp, center, blocked, n, geometry, scale, (corr, offset, cls), isa)
        assert got.shape == (b * period, n)
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("b,c,hw", [(2, 70, (5, 6)), (1, 3, (4, 9)), (0, 5, (3, 3))])
def test_ternary_conv_dots_are_exact(isa, b, c, hw):
    """Ternary codes x ternary weight, zero padding (code 0), stride and dilation: exact (the
    codes given as x, centre 0, threshold 0.5; scale 1, offset 0)."""
    g = torch.Generator().manual_seed(c)
    kernel, stride, padding, dilation = (3, 2), (2, 1), (1, 2), (1, 2)
    n = 37
    codes = torch.randint(-1, 2, (b, c, *hw), generator=g)
    w = _codes(n, c * 6, g, ternary=True).reshape(n, c, *kernel)
    want = F.conv2d(codes.double(), w.double(), None, stride, padding, dilation)
    period = want.shape[2] * want.shape[3]
    maps = torch.zeros(1, n), torch.zeros(period, dtype=torch.int32)
    geometry = (kernel, stride, padding, dilation)
    got = binary.ternary_conv(
        codes.float(), torch.zeros(c), 0.5, _conv_planes(w), n, geometry, torch.ones(n), maps, isa
    )
    assert got.dtype == torch.float32
    assert torch.equal(got.long(), want.permute(0, 2, 3, 1).reshape(-1, n).long())


def _conv_planes(w: torch.Tensor) -> list[torch.Tensor]:
    """A ternary conv weight [N, C, kh, kw] -> its blocked sign and nonzero tap rows."""
    n, c = w.shape[:2]
    taps = w.permute(0, 2, 3, 1).reshape(n, -1, c)
    return [binary.block_rows(binary.pack_bits(t).reshape(n, -1)) for t in (taps > 0, taps != 0)]


def _ternary_codes(x: torch.Tensor, center: torch.Tensor, threshold: float) -> torch.Tensor:
    """The simulation's codes (`numerics.centred_codes`, scale 2 t), channel axis 1 or last."""
    shape = [1] * x.dim()
    shape[1 if x.dim() == 4 else -1] = -1
    scale = torch.tensor(2 * threshold)
    return numerics.centred_codes(x, center.reshape(shape), scale, ternary=True).long()


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("m,k", [(5, 100), (1, 577), (0, 70), (3, 1)])
def test_ternary_bits_are_the_simulations_codes(isa, m, k):
    """The planes of ternary codes around a centre, bit for bit the simulation's, values on
    the threshold included (they are code 0)."""
    g = torch.Generator().manual_seed(m + k)
    center, t = torch.randn(k, generator=g) * 0.3, 0.375
    x = torch.randn(m, k, generator=g)
    x[:, ::7] = center[::7] + t  # exactly on the threshold: code 0
    x[:, 1::7] = center[1::7] - t
    sign, nonzero = binary.ternary_bits(x, center, t, isa)
    codes = _ternary_codes(x, center, t)
    assert torch.equal(sign, binary.pack_bits(codes > 0))
    assert torch.equal(nonzero, binary.pack_bits(codes != 0))


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("b,c,hw,n,geometry", CONV_CASES)
def test_ternary_conv_codes_its_float_input_as_the_simulation(isa, b, c, hw, n, geometry):
    """Float NCHW and channels-last inputs coded inside the kernel: the integer conv of the
    simulation's codes, rescaled with the maps of each position's class."""
    g = torch.Generator().manual_seed(c + n + 1)
    x = torch.randn(b, c, *hw, generator=g)
    center, t = torch.randn(c, generator=g) * 0.2, 0.4
    x[:, :, ::3] = center.reshape(1, -1, 1, 1) + t  # on the threshold: code 0
    kernel, stride, padding, dilation = geometry
    w = _codes(n, c * kernel[0] * kernel[1], g, ternary=True).reshape(n, c, *kernel)
    codes = _ternary_codes(x, center, t).double()
    dots = F.conv2d(codes, w.double(), None, stride, padding, dilation)
    period = dots.shape[2] * dots.shape[3]
    cls = torch.randint(0, 3, (period,), generator=g, dtype=torch.int32)
    scale, offset = torch.rand(n, generator=g), torch.randn(3, n, generator=g)
    dots = dots.permute(0, 2, 3, 1).reshape(b, period, n)
    want = (dots * scale.double() + offset[cls.long()].double()).reshape(-1, n)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        got = binary.ternary_conv(
            inp, center, t, _conv_planes(w), n, geometry, scale, (offset, cls), isa
        )
        assert got.shape == (b * period, n)
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_popcount_affine_on_ternary_planes(isa):
    g = torch.Generator().manual_seed(6)
    m, k, n = 9, 130, 35
    a, w = _codes(m, k, g, ternary=True), _codes(n, k, g, ternary=True)
    (a_s, a_nz), (w_s, w_nz) = _planes(a), _planes(w)
    scale, offset = torch.rand(n, generator=g), torch.randn(1, n, generator=g)
    got = binary.popcount_affine(
        a_s, binary.block_rows(w_s), n, k, scale, offset, None, isa,
        nonzero=(a_nz, binary.block_rows(w_nz)),
    )  # fmt: skip
    want = (a @ w.t()).double() * scale.double() + offset.double()
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-5)
