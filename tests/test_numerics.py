"""lowbit.numerics: bit-exact agreement with ONNX Runtime, properties, gradients, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper
from ort_reference import ort_quant_dequant

from lowbit.numerics import (
    dequantize,
    fake_quantize,
    pack,
    qparams,
    quantize,
    reduce_by,
    tensor_qparams,
    to_groups,
    unpack,
)
from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec

FAST = settings(max_examples=60, deadline=None)


def per_element(p: torch.Tensor, x: torch.Tensor, g: object) -> torch.Tensor:
    """A per-unit parameter broadcast to the full shape of `x`."""
    if isinstance(g, PerTensor):
        return p.reshape(()).expand(x.shape)
    if isinstance(g, PerChannel):
        shape = [1] * x.dim()
        shape[g.axis % x.dim()] = -1
        return p.reshape(shape).expand(x.shape)
    assert isinstance(g, PerGroup)
    return p.repeat_interleave(g.size, dim=g.axis % x.dim())


# --------------------------------------------------------------------------------------------
# Bit-exact agreement with ONNX Runtime QuantizeLinear / DequantizeLinear
# --------------------------------------------------------------------------------------------

ORT_KINDS = {  # name -> (bits, signed)
    "int8": (8, True),
    "uint8": (8, False),
    "int16": (16, True),
    "uint16": (16, False),
}


def _hand_params(
    base: float, spec: QuantSpec, n: int | None, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-picked scales (base, or base * (1 + c / 2) per channel) and zero points."""
    if n is None:
        scale = torch.tensor(base, dtype=torch.float32)
        count: tuple[int, ...] = ()
    else:
        scale = torch.tensor([base * (1 + c / 2) for c in range(n)], dtype=torch.float32)
        count = (n,)
    if spec.symmetric:
        zp = torch.zeros(count, dtype=torch.int32)
    else:
        span = spec.qmax - spec.qmin
        zp = torch.as_tensor(
            rng.integers(spec.qmin + span // 8, spec.qmax - span // 8, size=count),
            dtype=torch.int32,
        )
    return scale, zp


def _with_ties_and_outliers(
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec, g: object
) -> torch.Tensor:
    """Overwrite part of `x` with exact half steps (k + 0.5) * scale and far out-of-range values."""
    s = per_element(scale, x, g)
    z = per_element(zp, x, g).float()
    gen = torch.Generator().manual_seed(7)
    lo_k = spec.qmin - z - 3
    hi_k = spec.qmax - z + 3
    k = torch.floor(lo_k + torch.rand(x.shape, generator=gen) * (hi_k - lo_k))
    ties = (k + 0.5) * s
    pick = torch.rand(x.shape, generator=gen)
    x = torch.where(pick < 0.3, ties, x)
    far = torch.sign(torch.rand(x.shape, generator=gen) - 0.5) * s * (spec.qmax - spec.qmin) * 4
    return torch.where(pick > 0.9, far, x)


def _exact_ties(x: torch.Tensor, scale: torch.Tensor, g: object) -> int:
    v = x / per_element(scale, x, g)
    return int((v - torch.floor(v) == 0.5).sum())


@pytest.mark.parametrize("kind", list(ORT_KINDS))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "affine"])
@pytest.mark.parametrize("where", ["tensor", "axis0", "axis1"])
@pytest.mark.parametrize("scale_from", ["qparams", 0.1, 1 / 3, 2.0**-4])
def test_matches_onnxruntime_bit_exact(kind, symmetric, where, scale_from):
    bits, signed = ORT_KINDS[kind]
    g = {"tensor": PerTensor(), "axis0": PerChannel(0), "axis1": PerChannel(1)}[where]
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, granularity=g)
    rng = np.random.default_rng(hash((kind, symmetric, where, str(scale_from))) % 2**32)
    x = torch.as_tensor(rng.standard_normal((8, 6, 3, 3)).astype(np.float32)) * 0.7 + 0.2
    n = None if where == "tensor" else x.shape[g.axis]
    if scale_from == "qparams":
        scale, zp = tensor_qparams(x, spec)
    else:
        scale, zp = _hand_params(float(scale_from), spec, n, rng)
    x = _with_ties_and_outliers(x, scale, zp, spec, g)
    assert _exact_ties(x, scale, g) > 10  # the round-half-to-even path is exercised

    q = quantize(x, scale, zp, spec)
    y = dequantize(q, scale, zp, spec)
    fq = fake_quantize(x, scale, zp, spec)
    q_ref, y_ref = ort_quant_dequant(
        x, scale, zp, dtype=kind, axis=None if where == "tensor" else g.axis
    )
    np.testing.assert_array_equal(q.numpy().astype(np.int64), q_ref.astype(np.int64))
    assert np.array_equal(y.numpy(), y_ref)
    assert np.array_equal(fq.numpy(), y_ref)
    assert y.dtype == torch.float32
    # saturation really happened on both ends
    assert int(q.min()) == spec.qmin and int(q.max()) == spec.qmax


def test_round_half_to_even_and_saturation_small_example():
    spec = QuantSpec()
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -128.5, 1e9, -1e9])
    scale, zp = torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)
    q = quantize(x, scale, zp, spec)
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -128, 127, -128]
    q_ref, _ = ort_quant_dequant(x, scale, zp, dtype="int8")
    assert q_ref.tolist() == q.tolist()


@pytest.mark.parametrize("signed", [True, False], ids=["int4", "uint4"])
@pytest.mark.parametrize(
    "g", [PerTensor(), PerChannel(0), PerChannel(1), PerGroup(8, 1), PerGroup(2, 0)], ids=repr
)
def test_int4_matches_onnxruntime(signed, g):
    spec = QuantSpec(bits=4, signed=signed, symmetric=signed, granularity=g)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 32, generator=gen)
    scale, zp = tensor_qparams(x, spec)
    x = _with_ties_and_outliers(x, scale, zp, spec, g)
    q = quantize(x, scale, zp, spec)
    y = dequantize(q, scale, zp, spec)
    kw: dict[str, int] = {}
    if isinstance(g, PerChannel | PerGroup):
        kw["axis"] = g.axis
    if isinstance(g, PerGroup):
        kw["block_size"] = g.size
    try:
        q_ref, y_ref = ort_quant_dequant(x, scale, zp, dtype="int4" if signed else "uint4", **kw)
    except Exception as e:  # pragma: no cover - depends on the installed onnxruntime
        pytest.skip(f"onnxruntime cannot run 4-bit QuantizeLinear here: {e}")
    np.testing.assert_array_equal(q.numpy().astype(np.int64), q_ref.astype(np.int64))
    assert np.array_equal(y.numpy(), y_ref)
    assert np.array_equal(fake_quantize(x, scale, zp, spec).numpy(), y_ref)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("length", [1, 2, 7, 64, 65])
def test_pack_int4_matches_onnx_layout(signed, length):
    lo, hi = (-8, 7) if signed else (0, 15)
    q = torch.randint(lo, hi + 1, (length,), generator=torch.Generator().manual_seed(length))
    ours = pack(q, 4, signed=signed)
    elem = TensorProto.INT4 if signed else TensorProto.UINT4
    ref = helper.make_tensor("t", elem, [length], q.tolist())
    ref_bytes = np.frombuffer(ref.raw_data, np.uint8) if ref.raw_data else np.array(ref.int32_data)
    np.testing.assert_array_equal(ours.numpy().astype(np.int64), ref_bytes.astype(np.int64))
    # first element in the low nibble
    assert int(ours[0]) & 0xF == int(q[0]) & 0xF


# --------------------------------------------------------------------------------------------
# Properties (hypothesis)
# --------------------------------------------------------------------------------------------

finite32 = st.floats(
    min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32
)


@st.composite
def quant_case(draw, kinds=("tensor", "channel", "group"), monotone=False):
    bits = draw(st.integers(2, 16))
    signed = draw(st.booleans())
    symmetric = draw(st.booleans())
    narrow = signed and symmetric and draw(st.booleans())
    rows = draw(st.integers(1, 4))
    size = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(kinds))
    if kind == "tensor":
        g: object = PerTensor()
    elif kind == "channel":
        g = PerChannel(0 if monotone else draw(st.sampled_from([0, 1, -1])))
    else:
        g = PerGroup(size, -1) if monotone else PerGroup(size, draw(st.sampled_from([1, -1])))
    cols = size * groups
    scale_mag = draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e25]))
    data = draw(hnp.arrays(np.float32, (rows, cols), elements=finite32))
    if draw(st.booleans()):  # raw floats, any magnitude up to 2^100
        x = torch.as_tensor(data)
    else:  # values of one magnitude, so the grid is actually used
        x = torch.as_tensor(
            (data.astype(np.float64) % 1000.0 - 500.0) * scale_mag, dtype=torch.float32
        )
    spec = QuantSpec(
        bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow, granularity=g
    )
    return x, spec


def _fq(x, spec):
    scale, zp = tensor_qparams(x, spec)
    return fake_quantize(x, scale, zp, spec), scale, zp


@FAST
@given(quant_case())
def test_in_range_error_at_most_half_a_step(case):
    x, spec = case
    y, scale, zp = _fq(x, spec)
    g = spec.granularity
    s = per_element(scale, x, g).double()
    z = per_element(zp, x, g).double()
    lo, hi = (spec.qmin - z) * s, (spec.qmax - z) * s
    xd = x.double()
    inside = (xd >= lo) & (xd <= hi)
    err = (xd - y.double()).abs()
    tol = 4 * torch.finfo(torch.float32).eps * torch.maximum(xd.abs(), s)
    assert bool((err <= s / 2 + tol)[inside].all())
    assert bool(torch.isfinite(y).all())


@FAST
@given(quant_case())
def test_fake_quantize_idempotent_and_equal_to_dequantize_quantize(case):
    x, spec = case
    y, scale, zp = _fq(x, spec)
    assert torch.equal(fake_quantize(y, scale, zp, spec), y)
    assert torch.equal(dequantize(quantize(x, scale, zp, spec), scale, zp, spec), y)


@FAST
@given(quant_case(monotone=True))
def test_fake_quantize_monotonic(case):
    x, spec = case
    g = spec.granularity
    if isinstance(g, PerTensor):
        x = x.flatten().sort().values.reshape(x.shape)
    else:
        x = x.sort(dim=-1).values
    y, _, _ = _fq(x, spec)
    if isinstance(g, PerTensor):
        d = y.flatten().diff()
    elif isinstance(g, PerChannel):
        d = y.diff(dim=-1)
    else:
        d = to_groups(y, g).diff(dim=-1)
    assert bool((d >= 0).all())


@FAST
@given(quant_case())
def test_zero_is_exactly_representable(case):
    x, spec = case
    scale, zp = tensor_qparams(x, spec)
    zeros = torch.zeros_like(x)
    assert torch.equal(fake_quantize(zeros, scale, zp, spec), zeros)
    if not spec.symmetric:
        assert bool(((zp >= spec.qmin) & (zp <= spec.qmax)).all())


@FAST
@given(
    bits=st.sampled_from([1, 2, 4]),
    signed=st.booleans(),
    shape=st.tuples(st.integers(0, 3), st.integers(0, 37)),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, signed, shape, seed):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    q = torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed))
    packed = pack(q, bits, signed=signed)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], math.ceil(shape[-1] * bits / 8))
    back = unpack(packed, bits, shape[-1], signed=signed)
    assert back.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(back.long(), q.long())


# --------------------------------------------------------------------------------------------
# Gradients: straight-through estimator and LSQ
# --------------------------------------------------------------------------------------------


def test_ste_gradient_is_one_inside_zero_outside():
    spec = QuantSpec()
    scale, zp = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    inside = torch.tensor([-12.7, -12.0, -3.14, -0.05, 0.0, 0.04, 5.55, 12.6, 12.7])
    outside = torch.tensor([-100.0, -13.5, 13.0, 20.0, 1e6])
    x = torch.cat([inside, outside]).requires_grad_()
    fake_quantize(x, scale, zp, spec).sum().backward()
    expected = torch.cat([torch.ones_like(inside), torch.zeros_like(outside)])
    assert torch.equal(x.grad, expected)


def test_ste_gradient_affine_uint8():
    spec = QuantSpec(signed=False, symmetric=False)
    scale, zp = torch.tensor(0.5), torch.tensor(20, dtype=torch.int32)  # range [-10, 117.5]
    x = torch.tensor([-20.0, -10.0, 0.0, 50.0, 117.5, 200.0], requires_grad=True)
    fake_quantize(x, scale, zp, spec).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def _lsq_reference(x, upstream, scale, zp, spec, n_per_scale):
    """d loss / d scale by the LSQ formula, in float64 (Esser et al. 2020)."""
    v = x.double().numpy() / scale
    r = np.round(v)
    q = r + zp
    g = np.where(q < spec.qmin, spec.qmin - zp, np.where(q > spec.qmax, spec.qmax - zp, r - v))
    return float((g * upstream.double().numpy()).sum()) / math.sqrt(n_per_scale * spec.qmax)


@pytest.mark.parametrize(
    "spec, zp",
    [(QuantSpec(), 0), (QuantSpec(bits=4), 0), (QuantSpec(signed=False, symmetric=False), 37)],
)
def test_lsq_scale_gradient_matches_reference(spec, zp):
    gen = torch.Generator().manual_seed(11)
    s0 = 0.05
    x = torch.randn(64, generator=gen) * s0 * (spec.qmax - spec.qmin) / 3
    x[:3] = torch.tensor([1e3, -1e3, 0.0])  # clipped both ways, plus an exact zero
    upstream = torch.randn(64, generator=gen)
    scale = torch.tensor(s0, requires_grad=True)
    zpt = torch.tensor(zp, dtype=torch.int32)
    y = fake_quantize(x, scale, zpt, spec)
    # the learnable-scale path gives the same forward values as the plain one
    assert torch.equal(y, fake_quantize(x, scale.detach(), zpt, spec))
    (y * upstream).sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad) and scale.grad != 0
    ref = _lsq_reference(x, upstream, s0, zp, spec, x.numel())
    assert scale.grad.item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_lsq_per_channel_scale_gradient():
    spec = QuantSpec(granularity=PerChannel(0))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 16, generator=gen)
    x[0, 0] = 100.0
    upstream = torch.randn(4, 16, generator=gen)
    s0 = torch.tensor([0.01, 0.02, 0.03, 0.04])
    scale = s0.clone().requires_grad_()
    y = fake_quantize(x, scale, torch.zeros(4, dtype=torch.int32), spec)
    (y * upstream).sum().backward()
    for c in range(4):
        ref = _lsq_reference(x[c], upstream[c], float(s0[c]), 0, spec, 16)
        assert scale.grad[c].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_non_uniform_schemes_pass_gradient_straight_through():
    x = torch.randn(4, 8).requires_grad_()
    for spec in (QuantSpec(bits=1, scheme="binary"), QuantSpec(bits=4, scheme="log2")):
        scale, zp = tensor_qparams(x, spec)
        x.grad = None
        fake_quantize(x, scale, zp, spec).sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))


# --------------------------------------------------------------------------------------------
# Schemes
# --------------------------------------------------------------------------------------------


def test_binary_xnor_net():
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    w[0, 0, 0, 0] = 0.0
    spec = QuantSpec(bits=1, scheme="binary", granularity=PerChannel(0))
    scale, zp = tensor_qparams(w, spec)
    wn = w.double().numpy().reshape(8, -1)
    np.testing.assert_allclose(scale.numpy(), np.abs(wn).mean(1), rtol=1e-6)
    assert torch.equal(zp, torch.zeros(8, dtype=torch.int32))
    q = quantize(w, scale, zp, spec)
    assert set(q.unique().tolist()) == {-1, 1}
    assert torch.equal(q.long(), torch.where(w >= 0, 1, -1))
    y = fake_quantize(w, scale, zp, spec)
    assert torch.equal(y, torch.where(w >= 0, 1.0, -1.0) * scale.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("g", [PerTensor(), PerChannel(0), PerGroup(4, 1)], ids=repr)
def test_ternary_twn_matches_numpy(g):
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(bits=2, scheme="ternary", granularity=g)
    scale, zp = tensor_qparams(w, spec)
    q = quantize(w, scale, zp, spec)

    wn = w.double().numpy()
    if isinstance(g, PerTensor):
        rows = wn.reshape(1, -1)
    elif isinstance(g, PerChannel):
        rows = wn
    else:
        rows = wn.reshape(6, 4, 4).reshape(-1, 4)
    delta = 0.7 * np.abs(rows).mean(1, keepdims=True)
    kept = np.abs(rows) > delta
    alpha = (np.abs(rows) * kept).sum(1) / kept.sum(1)
    codes = (np.sign(rows) * kept).reshape(wn.shape)
    np.testing.assert_allclose(scale.numpy().reshape(-1), alpha, rtol=1e-6)
    np.testing.assert_array_equal(q.numpy(), codes)
    y = fake_quantize(w, scale, zp, spec)
    np.testing.assert_allclose(y.numpy(), codes * per_element(scale, w, g).numpy(), rtol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_log2_levels_are_powers_of_two_times_scale(bits, signed):
    spec = QuantSpec(bits=bits, signed=signed, scheme="log2")
    x = torch.randn(200, generator=torch.Generator().manual_seed(bits)) * 3
    x[:2] = torch.tensor([0.0, 1e-30])
    scale, zp = tensor_qparams(x, spec)
    y = fake_quantize(x, scale, zp, spec).double().numpy()
    s = float(scale)
    mant, exp = np.frexp(np.abs(y[y != 0]) / s)
    assert np.all(mant == 0.5)  # |y| / s is an exact power of two ...
    k = 1 - exp
    assert np.all((k >= 0) & (k < spec.log2_levels))  # ... 2^-k, k in [0, levels)
    assert np.all(np.abs(y[y != 0]) == s * 2.0**-k)
    if not signed:
        assert np.all(y >= 0)
    assert y[0] == 0
    assert float(np.abs(y).max()) == s  # the largest magnitude maps onto the scale itself


@FAST
@given(
    hi=st.floats(2.0**-100, 2.0**100, width=32),
    bits=st.integers(2, 16),
    signed=st.booleans(),
    symmetric=st.booleans(),
)
def test_pow2_scale_is_power_of_two_at_least_float_scale(hi, bits, signed, symmetric):
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric)
    s_float, _ = qparams(-hi / 3, hi, spec)
    s_pow2, _ = qparams(-hi / 3, hi, spec.with_(scale_type="pow2"))
    mant, _ = math.frexp(float(s_pow2))
    assert mant == 0.5
    assert float(s_pow2) >= float(s_float)
    assert float(s_pow2) < 2 * float(s_float)


def test_pow2_scale_just_above_a_power_of_two():
    hi = float(np.nextafter(np.float32(1024 * 127), np.float32(np.inf)))
    s_float, _ = qparams(-hi, hi, QuantSpec())
    assert float(s_float) > 1024.0
    s_pow2, _ = qparams(-hi, hi, QuantSpec(scale_type="pow2"))
    assert float(s_pow2) == 2048.0


def test_stochastic_rounding_unbiased_and_reproducible():
    spec = QuantSpec(rounding="stochastic")
    scale, zp = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    c = 0.123
    x = torch.full((20000,), c)
    y = fake_quantize(x, scale, zp, spec, generator=torch.Generator().manual_seed(0))
    assert set(np.unique(y.numpy()).tolist()) <= {np.float32(0.1), np.float32(0.2)}
    assert float(y.double().mean()) == pytest.approx(c, abs=2e-3)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return quantize(x[:1000], scale, zp, spec, generator=gen)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    # quantize and fake_quantize draw the same noise from the same generator state
    q = quantize(x[:1000], scale, zp, spec, generator=torch.Generator().manual_seed(3))
    y = fake_quantize(x[:1000], scale, zp, spec, generator=torch.Generator().manual_seed(3))
    assert torch.equal(dequantize(q, scale, zp, spec), y)
    # values on the grid are never moved
    on_grid = torch.tensor([0.0, 1.0, -2.0, 12.0])
    assert torch.equal(quantize(on_grid, torch.tensor(1.0), zp, spec), on_grid.to(torch.int8))


# --------------------------------------------------------------------------------------------
# Degenerate inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(),
        QuantSpec(signed=False, symmetric=False),
        QuantSpec(bits=4, granularity=PerChannel(0)),
        QuantSpec(bits=4, symmetric=False, granularity=PerGroup(4)),
        QuantSpec(bits=1, scheme="binary"),
        QuantSpec(bits=2, scheme="ternary", granularity=PerChannel(1)),
        QuantSpec(bits=4, scheme="log2"),
        QuantSpec(scale_type="pow2"),
    ],
    ids=repr,
)
def test_all_zero_tensor_gives_unit_scale(spec):
    x = torch.zeros(4, 8)
    scale, zp = tensor_qparams(x, spec)
    assert bool((scale == 1.0).all())
    y = fake_quantize(x, scale, zp, spec)
    assert bool(torch.isfinite(y).all())
    if spec.scheme == "binary":
        # binary has no zero code: 0 counts as +1, so an all-zero tensor comes back as +scale.
        assert torch.equal(y, torch.ones_like(x))
    else:
        assert torch.equal(y, x)


@pytest.mark.parametrize("value", [3.0, -2.5, 1e-3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_constant_tensor(value, symmetric):
    spec = QuantSpec(symmetric=symmetric, granularity=PerChannel(0))
    x = torch.full((3, 5), value)
    scale, zp = tensor_qparams(x, spec)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    y = fake_quantize(x, scale, zp, spec)
    assert bool(((y - x).abs() <= scale.reshape(-1, 1) / 2 + 1e-7).all())


def test_reduce_by_layouts():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert reduce_by(x, PerTensor(), lambda r: r.amax(1)).shape == ()
    assert reduce_by(x, PerChannel(1), lambda r: r.amax(1)).tolist() == [15.0, 19.0, 23.0]
    grouped = reduce_by(x, PerGroup(2, -1), lambda r: r.amax(1))
    assert grouped.shape == (2, 3, 2)
    assert torch.equal(grouped, x.reshape(2, 3, 2, 2).amax(-1))
    g1 = reduce_by(x, PerGroup(3, 1), lambda r: r.sum(1))
    assert torch.equal(g1, x.sum(1, keepdim=True))


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_raise(bad):
    spec = QuantSpec()
    x = torch.tensor([0.0, 1.0, bad])
    scale, zp = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x, scale, zp, spec)
    with pytest.raises(ValueError, match="NaN or Inf"):
        tensor_qparams(x, spec)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fake_quantize(x, scale, zp, spec)
    with pytest.raises(ValueError, match="NaN or Inf"):
        qparams(bad, 1.0, spec)


def test_empty_tensor_raises():
    with pytest.raises(ValueError, match="empty tensor"):
        tensor_qparams(torch.zeros(0, 4), QuantSpec())
    with pytest.raises(ValueError, match="empty tensor"):
        tensor_qparams(torch.zeros(0), QuantSpec(bits=1, scheme="binary"))


def test_pergroup_size_must_divide_axis():
    spec = QuantSpec(bits=4, granularity=PerGroup(3))
    with pytest.raises(ValueError, match="does not divide"):
        tensor_qparams(torch.randn(2, 8), spec)
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.randn(2, 8), torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int32), spec)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        tensor_qparams(torch.randn(2, 8), QuantSpec(granularity=PerChannel(2)))


def test_qparams_lo_above_hi():
    with pytest.raises(ValueError, match="greater than range maximum"):
        qparams(1.0, -1.0, QuantSpec())
    with pytest.raises(ValueError, match="greater than range maximum"):
        qparams(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), QuantSpec())


def test_qparams_rejects_data_driven_schemes():
    with pytest.raises(ValueError, match="tensor_qparams"):
        qparams(-1.0, 1.0, QuantSpec(bits=1, scheme="binary"))


@pytest.mark.parametrize(
    "q, bits, signed",
    [([0, 8], 4, True), ([-9], 4, True), ([16], 4, False), ([-1], 4, False), ([2], 2, True)],
)
def test_pack_out_of_range_raises(q, bits, signed):
    with pytest.raises(ValueError, match="cannot be packed"):
        pack(torch.tensor(q), bits, signed=signed)


@pytest.mark.parametrize("bits", [0, 3, 8])
def test_pack_bad_bits(bits):
    with pytest.raises(ValueError, match="pack bits must be 1, 2 or 4"):
        pack(torch.zeros(4, dtype=torch.int8), bits, signed=True)
    with pytest.raises(ValueError, match="pack bits must be 1, 2 or 4"):
        unpack(torch.zeros(4, dtype=torch.uint8), bits, 4, signed=True)


def test_unpack_bad_inputs():
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(4, dtype=torch.int8), 4, 4, signed=True)
    with pytest.raises(ValueError, match="does not fit"):
        unpack(torch.zeros(2, dtype=torch.uint8), 4, 5, signed=True)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=1, scheme="binary", granularity=PerChannel(0)),
        QuantSpec(bits=2, scheme="ternary", granularity=PerGroup(4)),
        QuantSpec(bits=3, scheme="log2"),
        QuantSpec(bits=3, signed=False, scheme="log2", granularity=PerChannel(1)),
    ],
    ids=repr,
)
def test_non_uniform_fake_quantize_is_exactly_dequantize_quantize(spec):
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(9)).requires_grad_()
    scale, zp = tensor_qparams(x, spec)
    y = fake_quantize(x, scale, zp, spec)
    assert torch.equal(y.detach(), dequantize(quantize(x, scale, zp, spec), scale, zp, spec))
    assert torch.equal(fake_quantize(y.detach(), scale, zp, spec), y.detach())
