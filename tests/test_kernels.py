"""lowbit.kernels against the simulation: per-token dynamic Linear (every GEMM route, as a C++ op
and as eager torch ops, the route choice and its non-VNNI fallback) and oneDNN int8 Conv2d, on
odd shapes, a batch of one and empty batches. No timing here (benchmarks/)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit import kernels, numerics, presets
from lowbit.export import reduce_range_config
from lowbit.kernels import dynamic, native, weight_only
from lowbit.nn import IntConv
from lowbit.spec import PerChannel, QuantSpec
from lowbit.workflows.conversion import convert, quantize_dynamic, quantize_weights
from lowbit.workflows.quantization import quantize

PER_TOKEN = QuantSpec(bits=8, narrow_range=True, granularity=PerChannel(0))


def _rel(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    if b.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def _sim_per_token(x: Tensor, spec: QuantSpec = PER_TOKEN) -> tuple[Tensor, Tensor]:
    scale, zp = numerics.tensor_qparams(x, spec)
    return numerics.quantize(x, scale, zp, spec), scale


@pytest.mark.parametrize("m,k", [(1, 7), (5, 37), (33, 64), (2, 1)])
def test_quantize_per_token_equals_numerics(m, k):
    g = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
    x[0] = 0.0  # an all-zero token: scale 1, codes 0
    q, scale = kernels.quantize_per_token(x)
    q_ref, s_ref = _sim_per_token(x)
    assert q.dtype == torch.int8
    torch.testing.assert_close(scale.reshape(-1), s_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)


def _dynamic_reference(x: Tensor, lin: nn.Linear, w_codes: Tensor, w_scale: Tensor) -> Tensor:
    """The simulation: fake-quantized tokens times the dequantized weight, in float64."""
    if x.shape[0] == 0:
        return lin.bias.double().expand(0, -1)
    q, scale = _sim_per_token(x)
    xq = q.double() * scale.double().reshape(-1, 1)
    w = w_codes.double() * w_scale.double().reshape(-1, 1)
    return xq @ w.t() + lin.bias.detach().double()


def _near_ties(rows: int, k: int, seed: int) -> Tensor:
    """Rows whose elements x make x * (1 / s) and x / s round to different codes (s the row's
    scale): a kernel that quantizes by multiplying with the reciprocal gets them wrong."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(rows, k)
    r = 0
    while r < rows:
        top = 1 + torch.rand((), generator=g)
        s = top / 127
        tie = (torch.arange(-126, 126) + 0.5) * s
        near, lo, hi = [tie], tie, tie
        for _ in range(3):  # up to three float32 steps either side of each tie
            lo, hi = torch.nextafter(lo, lo - 1), torch.nextafter(hi, hi + 1)
            near += [lo, hi]
        cand = torch.cat(near)
        bad = cand[torch.round(cand / s) != torch.round(cand * (1 / s))]
        if bad.numel() == 0:
            continue
        out[r, 0] = top
        out[r, 1:] = bad[torch.randint(bad.numel(), (k - 1,), generator=g)]
        r += 1
    return out


ROUTES = dynamic.default_routes()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("route", [*ROUTES, None])
def test_dynamic_int8_linear_matches_simulation(route, compiled, monkeypatch):
    monkeypatch.setitem(kernels.compile._state, "enabled", compiled)
    if compiled and native.ops() is None:
        pytest.skip("lowbit's C++ kernels did not build here")
    torch.manual_seed(0)
    k, n = 45, 19  # not multiples of 8 or 16
    lin = nn.Linear(k, n)
    wspec = presets.int8().weight
    assert wspec is not None
    w_scale, w_zp = numerics.tensor_qparams(lin.weight, wspec)
    codes = numerics.quantize(lin.weight, w_scale, w_zp, wspec)
    weights = dynamic.DynamicLinearWeights(codes, w_scale, lin.bias.detach())
    if route is not None:
        assert route in weights.routes
    # empty, a batch of one, odd, each of the VNNI kernel's row counts, around ONEDNN_MIN_ROWS
    for m in (0, 1, 2, 3, 4, 5, 7, 17, dynamic.ONEDNN_MIN_ROWS - 1, dynamic.ONEDNN_MIN_ROWS, 45):
        x = torch.randn(m, k) * torch.rand(m, 1) * 5
        if m > 2:
            x[1] = 0.0  # scale 1, codes 0
            x[2:4] = _near_ties(2, k, m)[: m - 2]
        y = dynamic.dynamic_int8_linear(x, weights, route)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert _rel(y, _dynamic_reference(x, lin, codes, w_scale)) < 1e-5, m
    for x in (_near_ties(1, k, 1), torch.zeros(1, k), torch.full((1, k), -1e-39)):
        y = dynamic.dynamic_int8_linear(x, weights, route)
        assert _rel(y, _dynamic_reference(x, lin, codes, w_scale)) < 1e-5
    for m in (1, 3, 40):  # a row holding a NaN or an infinity: only that row is not finite
        x = torch.randn(m, k)
        x[-1, 3] = float("nan") if m != 3 else float("inf")
        y = dynamic.dynamic_int8_linear(x, weights, route)
        assert not y[-1].isfinite().any() and y[:-1].isfinite().all()
    for m in (1, 3, 40):  # an input that requires grad: the same numbers, no graph
        x = torch.randn(m, k, requires_grad=True)
        y = dynamic.dynamic_int8_linear(x, weights, route)
        assert not y.requires_grad
        assert _rel(y, _dynamic_reference(x.detach(), lin, codes, w_scale)) < 1e-5


def test_near_ties_catch_reciprocal_quantization():
    """The tie rows above would fail a kernel that quantizes as x * (1 / s)."""
    x = _near_ties(3, 45, 0)
    q, scale = _sim_per_token(x)
    wrong = torch.round(x * (1 / scale.reshape(-1, 1)))
    assert (wrong != q).sum() >= 3 * 44


def test_dynamic_routes_without_vnni_use_int_mm(monkeypatch):
    monkeypatch.setattr(dynamic, "u8_gemm_safe", lambda: False)
    w = torch.randint(-127, 128, (4096, 4096), dtype=torch.int8)
    weights = dynamic.DynamicLinearWeights(w, torch.ones(4096), torch.zeros(4096))
    assert weights.routes == ("int_mm",)
    for m in (1, 8, 128, 4096):
        assert dynamic.choose_route(m, 4096, 4096, weights.routes, True) == "int_mm"
    x = torch.randn(3, 4096)
    ref = (_sim_per_token(x)[0].double() @ w.double().t()) * _sim_per_token(x)[1].reshape(-1, 1)
    assert _rel(dynamic.dynamic_int8_linear(x, weights), ref) < 1e-5


def test_dynamic_route_choice():
    every = dynamic.ROUTES
    for m, k, n, native_route, eager_route in [
        (1, 768, 768, "vnni", "int_mm"),
        (1, 4096, 4096, "vnni", "fbgemm"),
        (31, 4096, 4096, "vnni", "fbgemm"),
        (8, 768, 768, "vnni", "fbgemm"),
        (128, 768, 3072, "onednn", "onednn"),
    ]:
        assert dynamic.choose_route(m, k, n, every, True) == native_route
        assert dynamic.choose_route(m, k, n, every, False) == eager_route
    assert dynamic.choose_route(4096, 768, 768, ("int_mm", "fbgemm"), True) == "int_mm"


def test_vnni_detection(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False, raising=False)
    assert not dynamic.u8_gemm_safe()
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True)
    monkeypatch.setattr(dynamic, "int_mm_exact_here", lambda: True)
    assert dynamic.u8_gemm_safe()
    monkeypatch.setattr(dynamic, "int_mm_exact_here", lambda: False)  # oneDNN capped below VNNI
    assert not dynamic.u8_gemm_safe()
    monkeypatch.delattr(torch.cpu, "_is_vnni_supported")
    assert not dynamic.u8_gemm_safe()


def test_dynamic_route_whose_pack_fails_falls_back(monkeypatch):
    monkeypatch.setattr(dynamic, "_fbgemm_pack", lambda codes, scale: None)
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (7, 9), dtype=torch.int8)
    weights = dynamic.DynamicLinearWeights(
        w, torch.full((7,), 0.1), torch.zeros(7), routes=dynamic.ROUTES
    )
    x = torch.randn(4, 9)
    q, s = _sim_per_token(x)
    ref = (q.double() @ w.double().t()) * s.double().reshape(-1, 1) * 0.1
    assert _rel(dynamic.dynamic_int8_linear(x, weights, "fbgemm"), ref) < 1e-5
    assert "fbgemm" not in weights.routes


def test_quantize_dynamic_module_matches_simulation_and_beats_per_tensor_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 50), nn.ReLU(), nn.Linear(50, 21))
    dyn = quantize_dynamic(model)
    assert all(layer.kernel == "int_mm" for layer in (dyn[0], dyn[2]))
    for lead in ((4,), (1,), (0,), (2, 5), (1, 1), (37,)):
        x = torch.randn(*lead, 37)
        with torch.no_grad():
            h = F.relu(_layer_reference(model[0], dyn[0], x.reshape(-1, 37)))
            ref = _layer_reference(model[2], dyn[2], h).reshape(*lead, 21)
            assert _rel(dyn(x), ref) < 1e-4, lead


def test_packed_weights_are_a_cache_not_state():
    torch.manual_seed(0)
    dyn = quantize_dynamic(nn.Sequential(nn.Linear(37, 50)))
    keys = set(dyn.state_dict())
    x = torch.randn(40, 37)  # packs the oneDNN weight where it is used
    with torch.no_grad():
        y = dyn(x)
        assert "dynamic" in dyn[0].current_packs()
        assert set(dyn.state_dict()) == keys
        twin = copy.deepcopy(dyn)  # oneDNN's packed tensors cannot be copied: not copied
        assert "dynamic" not in twin[0].current_packs()
        torch.testing.assert_close(twin(x), y, rtol=0, atol=0)
        other = quantize_dynamic(nn.Sequential(nn.Linear(37, 50)))
        twin.load_state_dict(other.state_dict())  # new weights: the packs are rebuilt
        torch.testing.assert_close(twin(x), other(x), rtol=0, atol=0)
        dyn.double()  # new buffers: the packs made from the old ones are dropped
        assert "dynamic" not in dyn[0].current_packs()


def test_weight_only_int8_too_deep_for_vnni_runs_the_float_loop(monkeypatch):
    monkeypatch.setitem(kernels.compile._state, "enabled", True)
    if native.ops() is None or not dynamic.vnni_kernel_cpu():
        pytest.skip("no C++ kernels or no VNNI here")
    w = torch.ones(16, 65537, dtype=torch.int8)
    assert weight_only.vnni_pack(w) == []  # 255 * 127 * K would overflow int32
    x = torch.ones(1, 65537)
    y = weight_only.linear_int8(x, w, torch.ones(16), torch.zeros(16), [])
    torch.testing.assert_close(y, torch.full((1, 16), 65537.0))


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_packs_are_dropped_on_reload(bits, monkeypatch):
    monkeypatch.setitem(kernels.compile._state, "enabled", True)
    torch.manual_seed(0)
    one, two = (quantize_weights(nn.Sequential(nn.Linear(64, 32)), bits=bits) for _ in range(2))
    x = torch.randn(1, 64)
    with torch.no_grad():
        one(x)  # packs its weight
        one.load_state_dict(two.state_dict())
        torch.testing.assert_close(one(x), two(x), rtol=0, atol=0)


def _layer_reference(lin: nn.Module, int_layer: nn.Module, x: Tensor) -> Tensor:
    assert isinstance(lin, nn.Linear)
    return _dynamic_reference(
        x,
        lin,
        int_layer.weight_codes(),
        int_layer.weight_scale,  # type: ignore[operator]
    ).float()


class StaticSamePad(nn.Conv2d):
    """The shape of efficientnet_lite_pytorch's Conv2dStaticSamePadding."""

    def __init__(self, *args, pad: tuple[int, int, int, int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x: Tensor) -> Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = StaticSamePad(3, 12, 3, stride=2, pad=(0, 1, 0, 1))
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)  # depthwise
        self.pw = nn.Conv2d(12, 7, 1, bias=False)  # pointwise, odd channel count
        self.wide = StaticSamePad(7, 5, 5, stride=2, pad=(1, 2, 1, 2))

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu6(self.stem(x))
        x = F.relu6(self.dw(x))
        return self.wide(self.pw(x) + 0.1)


@pytest.mark.skipif(not kernels.onednn_conv_available(), reason="no oneDNN in this torch")
@pytest.mark.parametrize(
    "config,fused",
    [("int8", False), ("int8_asymmetric", False), ("int8", True), ("reduce_range", False)],
)
def test_onednn_conv_matches_simulation(config, fused, monkeypatch):
    monkeypatch.setitem(kernels.compile._state, "enabled", fused)
    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 15, 13)]
    if config == "reduce_range":  # 7-bit weights: oneDNN's conv is exact on any x86 CPU
        qconfig = reduce_range_config(presets.int8_asymmetric())
    else:
        qconfig = getattr(presets, config)()
    sim = quantize(ConvNet(), qconfig, calib, progress=False)
    assert qconfig.weight is not None
    if not kernels.conv.onednn_conv_exact(qconfig.weight.qmin, qconfig.weight.qmax):
        pytest.skip("no VNNI here: 8-bit weights dequantize (test_int8_kernels_are_exact_here)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer falls back
        int_model = convert(sim)
    for name in ("stem", "dw", "pw", "wide"):
        layer = getattr(int_model, name)
        assert isinstance(layer, IntConv) and layer.kernel == "onednn_qconv", name
    for shape in ((1, 3, 15, 13), (3, 3, 9, 10), (2, 3, 16, 16)):
        x = torch.randn(*shape) * 1.5  # some values outside the calibrated range: clipped
        with torch.no_grad():
            assert _rel(int_model(x), sim(x)) < 1e-5, shape
    with torch.no_grad():
        assert int_model(torch.randn(0, 3, 15, 13)).shape == sim(torch.randn(0, 3, 15, 13)).shape


@pytest.mark.skipif(not kernels.onednn_conv_available(), reason="no oneDNN in this torch")
def test_conv_packs_are_rebuilt_after_reload_and_in_place_changes():
    """The prepacked oneDNN weights follow the buffers they come from: a load_state_dict (which
    copies into the same tensors) or an in-place change is seen at the next call."""
    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 15, 13)]
    config = reduce_range_config(presets.int8_asymmetric())  # 7-bit weights: oneDNN on any x86
    one, two = (convert(quantize(ConvNet(), config, calib, progress=False)) for _ in range(2))
    x = torch.randn(2, 3, 15, 13)
    with torch.no_grad():
        assert one.pw.kernel == "onednn_qconv"
        one(x)  # packs its convolutions
        one.load_state_dict(two.state_dict())
        torch.testing.assert_close(one(x), two(x), rtol=0, atol=0)
        one.pw.weight_scale.mul_(2)
        two.pw.weight_scale.mul_(2)
        torch.testing.assert_close(one(x), two(x), rtol=0, atol=0)


@pytest.mark.skipif(not kernels.onednn_conv_available(), reason="no oneDNN in this torch")
def test_compiled_converted_conv_model_matches_eager(monkeypatch):
    """`torch.compile(convert(...))`, the fast route of docs/kernels.md: dynamo traces the eager
    kernels (no nested compile) and inductor fuses the elementwise steps around the oneDNN
    convolutions, with the same numbers."""
    monkeypatch.setitem(kernels.compile._state, "enabled", True)
    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 15, 13)]
    int_model = convert(quantize(ConvNet(), presets.int8(), calib, progress=False))
    x = torch.randn(2, 3, 15, 13)
    with torch.no_grad():
        # Run eagerly first, as users warm up: the oneDNN packs built here must not be baked
        # into the graph as plain tensors (that read out of bounds and crashed the process).
        eager = int_model(x)
        compiled = torch.compile(int_model)
        assert _rel(compiled(x), eager) < 1e-5
        assert _rel(int_model(x), eager) == 0


def test_conv_without_kernel_keeps_the_fallback():
    class Custom(nn.Conv2d):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2

    torch.manual_seed(0)
    net = nn.Sequential(Custom(3, 4, 3), nn.Conv2d(4, 4, 3, padding=2, padding_mode="circular"))
    sim = quantize(net, presets.int8(), [torch.randn(2, 3, 8, 8)], progress=False)
    with pytest.warns(UserWarning, match="dequantize-then-float"):
        int_model = convert(sim)
    assert [m.kernel for m in int_model] == ["dequantize", "dequantize"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _rel(int_model(x), sim(x)) < 1e-5


@pytest.mark.parametrize("kernel", ["aten", "vnni", "avx512"])
@pytest.mark.parametrize("bits,group,k", [(8, None, 96), (8, None, 45), (4, 32, 96), (4, None, 96)])
def test_weight_only_kernels_match_dequantized_weight(bits, group, k, kernel, monkeypatch):
    """The C++ kernels, through VNNI and through AVX-512 floats (int8 with K not a multiple of
    16), and the aten kernels."""
    compiled = kernel != "aten"
    monkeypatch.setitem(kernels.compile._state, "enabled", compiled)
    if compiled and not (native.ops() is not None and weight_only._avx512()):
        pytest.skip("no C++ kernels or no AVX-512 here")
    if kernel == "vnni" and not dynamic.vnni_kernel_cpu():
        pytest.skip("no VNNI here")
    if kernel == "avx512":
        monkeypatch.setattr(dynamic, "vnni_kernel_cpu", lambda: False)
    torch.manual_seed(0)
    n = 48  # the int4 kernels need N % 16 == 0 and an even K
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_weights(nn.Sequential(nn.Linear(k, n)), bits=bits, group_size=group)
    layer = q[0]
    assert layer.kernel == ("int8pack" if bits == 8 else "int4pack")
    with torch.no_grad():
        layer(torch.randn(1, k))
    assert bool(layer.current_packs().get("vnni")) == (kernel == "vnni")
    # many draws, so some rows' largest element rounds up to the 24-bit fixed-point limit of
    # the VNNI route (once a wrong code); 9 and 37 rows: the 4-row chunks and their remainders
    for lead in [(1,), (1, 3), (0,), (9,), (37,)] + [(2, 2)] * 30:
        x = torch.randn(*lead, k)
        assert weight_only.applies(x.reshape(-1, k)) == (compiled and x.numel() > 0)
        ref = F.linear(x.double(), layer.dequantized_weight().double(), layer.bias.double())
        with torch.no_grad():
            assert _rel(layer(x), ref) < 1e-5, lead


@pytest.mark.skipif("vnni" not in ROUTES, reason="no VNNI on this CPU")
def test_vnni_kernel_on_every_block_and_row_remainder(monkeypatch):
    """Output blocks of 16 taken four at a time plus a remainder, rows four at a time plus 1-3,
    K not a multiple of 4 (padded), and a NaN row that spoils only its own output row."""
    monkeypatch.setitem(kernels.compile._state, "enabled", True)
    ops = native.ops()
    if ops is None:
        pytest.skip("lowbit's C++ kernels did not build here")
    g = torch.Generator().manual_seed(0)
    for k, n in ((1, 1), (45, 83), (301, 16), (64, 130)):
        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        w_scale, bias = torch.rand(n, generator=g) / 50, torch.randn(n, generator=g)
        weights = dynamic.DynamicLinearWeights(codes, w_scale, bias, routes=("vnni", "int_mm"))
        for m in range(1, 10):
            x = torch.randn(m, k, generator=g) * 3
            q, s = _sim_per_token(x)
            ref = (q.double() @ codes.double().t()) * s.double().reshape(-1, 1)
            ref = ref * w_scale.double() + bias.double()
            assert _rel(dynamic.dynamic_int8_linear(x, weights, "vnni"), ref) < 1e-5, (m, k, n)
    x = torch.randn(3, k, generator=g)
    x[1, 5] = float("nan")
    y = dynamic.dynamic_int8_linear(x, weights, "vnni")
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
    with pytest.raises(RuntimeError, match="features"):
        dynamic.dynamic_int8_linear(torch.randn(2, k + 4), weights, "vnni")
    with pytest.raises(RuntimeError, match="overflows int32"):
        ops.vnni_pack(torch.zeros(2, 65537, dtype=torch.int8))


def test_compiled_quantize_dynamic_model_matches_eager():
    """Under `torch.compile` dynamo traces the eager form of the kernels (the C++ ops are not
    traced): same numbers."""
    torch.manual_seed(0)
    dyn = quantize_dynamic(nn.Sequential(nn.Linear(37, 50), nn.ReLU(), nn.Linear(50, 21)))
    compiled = torch.compile(dyn)
    for m in (1, 3, 40):
        x = torch.randn(m, 37)
        with torch.no_grad():
            assert _rel(compiled(x), dyn(x)) < 1e-5, m


def test_compiled_kernel_is_checked_against_eager_before_it_is_trusted(monkeypatch):
    """A compiled kernel that computes other codes than the eager one on this CPU is dropped with
    a warning; each new signature is checked once, then trusted."""
    monkeypatch.setitem(kernels.compile._state, "enabled", True)
    monkeypatch.setitem(kernels.compile._state, "broken", False)
    calls = []

    def codes(x: Tensor, shift: int) -> Tensor:
        calls.append("eager")
        return (x + shift).to(torch.uint8)

    def right(x: Tensor, shift: int) -> Tensor:
        calls.append("compiled")
        return (x + shift).to(torch.uint8)

    checked = kernels.compile.Compiled(codes)
    checked._compiled = right
    x = torch.arange(6.0)
    for _ in range(2):
        assert torch.equal(checked(x, 1), codes(x, 1))
    assert calls.count("compiled") == 2 and calls.count("eager") == 3  # checked once, then trusted
    checked(torch.arange(7.0), 1)  # a new shape: checked again
    assert calls.count("eager") == 4

    wrong = kernels.compile.Compiled(codes)
    wrong._compiled = lambda x, shift: torch.zeros_like(x, dtype=torch.uint8)
    with pytest.warns(UserWarning, match="other values than the eager one"):
        assert torch.equal(wrong(x, 1), codes(x, 1))
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(wrong(x, 1), codes(x, 1))  # eager for good, no second warning
    assert "compiled" not in calls


def test_failed_native_build_warns_once_and_keeps_the_eager_kernels(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(kernels.compile._state, "enabled", True)
    monkeypatch.setattr(native, "_state", {"ops": None, "tried": False})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    dyn = quantize_dynamic(nn.Sequential(nn.Linear(37, 50)))
    x = torch.randn(3, 37)
    with pytest.warns(UserWarning, match="building the C.. kernels failed.*no C.. compiler"):
        y = dyn(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        torch.testing.assert_close(dyn(x), y, rtol=0, atol=0)
    assert native.ops() is None
    monkeypatch.setitem(kernels.compile._state, "enabled", False)  # the eager kernels
    torch.testing.assert_close(dyn(x), y, rtol=0, atol=0)


def _saturating_codes(rows: int, k: int) -> Tensor:
    """int8 codes at the ends of the range (127, -128, -127): every pair of their products
    overflows int16 where a uint8 x int8 GEMM adds pairs without VNNI (255 * 127 * 2 > 2^15)."""
    pattern = torch.tensor([127, 127, -128, -127, 127], dtype=torch.int8)
    return pattern[torch.arange(rows * k) % len(pattern)].reshape(rows, k)


def test_int8_kernels_are_exact_here(monkeypatch, record_property):
    """Whatever kernels this CPU runs (oneDNN on AMX, AVX-512 VNNI or AVX2; lowbit's VNNI kernel
    or not), int8 products are exact: the route taken is recorded, the result checked against
    int64 / the simulation on codes that saturate a GEMM without VNNI."""
    route = kernels.cpu_route()
    assert route["u8_gemm_exact"] == str(dynamic.u8_gemm_safe())
    a, w = _saturating_codes(5, 37), _saturating_codes(11, 37)
    exact = a.long() @ w.long().t()
    assert torch.equal(dynamic.int_mm(a, dynamic.int_mm_operand(w), 11).long(), exact)
    monkeypatch.setattr(dynamic, "int_mm_exact_here", lambda: False)  # the split of a non-VNNI CPU
    assert dynamic.int_mm_operand(w).shape == (37, 22)
    assert torch.equal(dynamic.int_mm(a, dynamic.int_mm_operand(w), 11).long(), exact)
    monkeypatch.undo()
    if kernels.onednn_conv_available():
        torch.manual_seed(0)
        sim = quantize(ConvNet(), presets.int8(), [torch.randn(4, 3, 15, 13)], progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # without VNNI the convs dequantize, and say so
            int_model = convert(sim)
        route["conv"] = int_model.pw.kernel
        assert (route["conv"] == "onednn_qconv") == kernels.conv.onednn_conv_exact(-127, 127)
        x = torch.randn(2, 3, 16, 16) * 4  # saturated inputs: uint8 codes at 0 and 255
        with torch.no_grad():
            assert _rel(int_model(x), sim(x)) < 1e-5  # exact sums, float rounding of the rescale
    record_property("kernel_route", route)
    print("kernel route:", route)


def test_oneDNN_without_vnni_is_seen_and_avoided():
    """Simulates a CPU without VNNI (oneDNN capped at AVX2, as on Zen 3 or Haswell): lowbit sees
    that oneDNN's int8 GEMM saturates, splits the Linear weight and keeps 8-bit convs out of
    oneDNN; 7-bit (reduce_range) weights still run oneDNN's int8 conv, exactly."""
    script = f"""
import sys, warnings, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from lowbit import presets
from lowbit.workflows.quantization import quantize
from lowbit.workflows.conversion import convert
from lowbit.export import reduce_range_config
from lowbit.kernels import dynamic, set_compile
from test_kernels import ConvNet, _rel, _saturating_codes
set_compile(False)
assert not dynamic.int_mm_exact_here() and not dynamic.u8_gemm_safe()
a, w = _saturating_codes(5, 37), _saturating_codes(11, 37)
assert torch.equal(dynamic.int_mm(a, dynamic.int_mm_operand(w), 11).long(), a.long() @ w.long().t())
torch.manual_seed(0)
calib, x = [torch.randn(4, 3, 15, 13)], torch.randn(2, 3, 16, 16) * 4
for config, kernel in ((presets.int8(), "dequantize"),
                       (reduce_range_config(presets.int8_asymmetric()), "onednn_qconv")):
    sim = quantize(ConvNet(), config, calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int_model = convert(sim)
    assert int_model.pw.kernel == kernel, int_model.pw.kernel
    with torch.no_grad():
        assert _rel(int_model(x), sim(x)) < 1e-5
"""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "isa:Intel AVX2\n" in out.stdout  # oneDNN's own report: the cap took effect


def test_a_build_killed_while_holding_torchs_lock_does_not_hang_the_next(monkeypatch, tmp_path):
    """torch's lock file, left by a killed build, would make every later build wait forever; a
    build holding lowbit's lock (which dies with its holder) knows it is stale and clears it."""
    import torch.utils.cpp_extension

    (tmp_path / "lock").touch()  # what a SIGKILL during a build leaves
    seen = {}

    def load(**kwargs):
        seen["lock left"] = (tmp_path / "lock").exists()
        seen["build_directory"] = kwargs["build_directory"]

    monkeypatch.setattr(native, "_state", {"ops": None, "tried": False})
    monkeypatch.setitem(kernels.compile._state, "enabled", True)
    monkeypatch.setattr(
        torch.utils.cpp_extension, "_get_build_directory", lambda *a, **k: str(tmp_path)
    )
    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    native._build()
    assert seen == {"lock left": False, "build_directory": str(tmp_path)}
