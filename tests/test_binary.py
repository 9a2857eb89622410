"""Binary and ternary layers on bits (issue 20): converted modules against the simulation and
against float64 formulas of their integer arithmetic, centred binary activations, the first /
last layer policy, files, and an XNOR-Net trained by QAT on the digits."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import kernels, presets
from lowbit.cli import demo
from lowbit.config import QuantConfig
from lowbit.kernels import native
from lowbit.nn.binary_act import CenteredSign
from lowbit.nn.int_binary import IntBinaryConv, IntBinaryLinear
from lowbit.spec import PerChannel, QuantSpec

XNOR = QuantConfig(weight=presets.binary().weight, input=presets.binary(xnor=True).input)
# ternary weights x per-tensor ternary inputs: centred as XNOR's (`CenteredSign`)
TERNARY2 = presets.ternary("ternary")
CENTRED = [(XNOR, "xnor"), (TERNARY2, "ternary")]


@pytest.fixture(params=["eager", "native"])
def native_kernels(request, monkeypatch):
    """Each test runs on the eager twins and on the C++ kernels (where they build)."""
    on = request.param == "native"
    monkeypatch.setitem(kernels.compile._state, "enabled", on)
    if on and native.ops() is None:
        pytest.skip("lowbit's C++ kernels are not built here")
    return on


def _quiet_convert(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.convert(model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _signs(x: torch.Tensor, center: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The codes of a centred input (float32 comparisons, as the simulation defines them)."""
    ternary = layer.input_spec.scheme == "ternary"
    scale = layer.input_scale.float()
    return lowbit.numerics.centred_codes(x.float(), center.float(), scale, ternary).double()


@pytest.mark.parametrize("config,kernel", CENTRED)
def test_xnor_linear_is_the_integer_formula(native_kernels, config, kernel):
    torch.manual_seed(0)
    sim = lowbit.quantize(
        nn.Sequential(nn.Linear(100, 19)), config, [torch.randn(8, 100) + 1], progress=False
    )
    layer = _quiet_convert(sim)[0]
    assert isinstance(layer, IntBinaryLinear) and layer.kernel == kernel
    w = layer.weight_codes().double()
    alpha, beta, c = (
        layer.weight_scale.double(),
        layer.input_scale.double(),
        layer.input_center.double(),
    )
    bias = layer.module.bias.double()
    for shape in ((7, 100), (1, 100), (0, 100), (2, 3, 100)):
        x = torch.randn(*shape) + 1
        dots = _signs(x, c, layer) @ w.t()  # the integers the popcounts compute
        want = dots * beta * alpha + (w * alpha.unsqueeze(1)) @ c + bias
        with torch.no_grad():
            got, simulated = layer(x), sim(x)
        assert got.shape == simulated.shape == want.shape
        if x.numel():
            assert _rel(got, want) < 1e-6 and _rel(got, simulated) < 1e-5


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 70, 3, stride=2, padding=1),  # 70 channels: two words per tap
        nn.ReLU(),
        nn.Conv2d(70, 19, (3, 2), padding=(2, 1), dilation=2),
    ).eval()


@pytest.mark.parametrize("config,kernel", CENTRED)
def test_xnor_conv_is_the_integer_formula_with_zero_padding(native_kernels, config, kernel):
    calib = [torch.randn(4, 3, 9, 11) for _ in range(2)]
    sim = lowbit.quantize(_conv_net(), config, calib, progress=False)
    converted = _quiet_convert(sim)
    conv = converted[2]
    assert isinstance(conv, IntBinaryConv) and conv.kernel == kernel
    m = conv.module
    for shape in ((5, 3, 9, 11), (1, 3, 13, 7), (0, 3, 9, 11), (3, 9, 11)):
        x = torch.randn(*shape)
        with torch.no_grad():
            got, simulated = converted(x), sim(x)
            h = converted[1](converted[0](x))
        assert got.shape == simulated.shape
        if not x.numel():
            continue
        batch = h if h.dim() == 4 else h.unsqueeze(0)
        c = conv.input_center.reshape(1, -1, 1, 1)
        levels = c.double() + conv.input_scale.double() * _signs(batch, c, conv)
        want = F.conv2d(
            levels,
            conv.dequantized_weight().double(),
            m.bias.double(),
            m.stride,
            m.padding,
            m.dilation,
        )
        assert _rel(got if got.dim() == 4 else got.unsqueeze(0), want) < 1e-6
        assert _rel(got, simulated) < 1e-5


@pytest.mark.parametrize(
    "config,kernel",
    [
        (presets.binary(), "bwn"),
        (presets.ternary(), "ternary"),
        (presets.ternary("int8"), "ternary"),
        (TERNARY2, "ternary"),
    ],
)
def test_bwn_and_ternary_linears_match_the_simulation(native_kernels, config, kernel):
    torch.manual_seed(1)
    sim = lowbit.quantize(
        nn.Sequential(nn.Linear(77, 19)), config, [torch.randn(8, 77)], progress=False
    )
    layer = _quiet_convert(sim)[0]
    assert isinstance(layer, IntBinaryLinear) and layer.kernel == kernel
    assert layer(torch.randn(0, 77)).shape == (0, 19)
    for shape in ((6, 77), (1, 77)):
        x = torch.randn(*shape)
        with torch.no_grad():
            assert _rel(layer(x), sim(x)) < 1e-5


def test_ternary_conv_with_ternary_inputs_runs_on_bits(native_kernels):
    """Ternary weights x ternary inputs in a Conv2d: popcounts on the planes, as the simulation
    (odd channels, stride, dilation, padding; an unbatched input, an empty batch)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(7, 11, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    sim = lowbit.quantize(nn.Sequential(conv), TERNARY2, [torch.randn(2, 7, 9, 8)], progress=False)
    layer = _quiet_convert(sim)[0]
    assert isinstance(layer, IntBinaryConv) and layer.kernel == "ternary"
    assert layer(torch.randn(0, 7, 9, 8)).shape == (0, 11, 5, 8)
    for x in (torch.randn(3, 7, 9, 8), torch.randn(7, 9, 8)):
        with torch.no_grad():
            assert _rel(layer(x), sim(x)) < 1e-5


def test_ternary_int8_inputs_sum_exactly():
    torch.manual_seed(2)
    sim = lowbit.quantize(
        nn.Sequential(nn.Linear(45, 7)),
        presets.ternary("int8"),
        [torch.randn(4, 45)],
        progress=False,
    )
    layer = _quiet_convert(sim)[0]
    x = torch.randn(5, 45)
    s = layer.input_scale.double()
    q = torch.clamp(torch.round(x.double() / s), -127, 127)
    want = (
        q @ layer.weight_codes().double().t()
    ) * s * layer.weight_scale.double() + layer.module.bias.double()
    assert _rel(layer(x), want) < 1e-6


def test_centred_sign_levels_and_straight_through_gradients():
    x = torch.tensor([[-2.0, 0.5], [1.0, 3.0]], requires_grad=True)
    center = torch.tensor([0.0, 1.0], requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    y = lowbit.numerics.centered_sign(x, center, scale, axis=1)
    assert y.tolist() == [[-1.0, 0.0], [1.0, 2.0]]  # c - s below the centre, c + s from it on
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0], [1.0, 0.0]]  # inside |x - c| <= s only
    assert center.grad.tolist() == [1.0, 1.0]  # the outside ones: one per channel
    assert scale.grad is not None and math.isfinite(float(scale.grad))


def test_centred_ternary_levels_and_straight_through_gradients():
    x = torch.tensor([[-2.0, 0.5, 1.4], [0.2, 3.0, 1.0]], requires_grad=True)
    center = torch.tensor([0.0, 1.0, 1.0], requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    y = lowbit.numerics.centered_sign(x, center, scale, axis=1, ternary=True)
    # the nearest of c - s, c, c + s; |x - c| = s / 2 (0.5 at c = 1) stays at c
    assert y.tolist() == [[-1.0, 1.0, 1.0], [0.0, 2.0, 1.0]]
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]  # inside |x - c| <= s
    assert center.grad.tolist() == [1.0, 1.0, 0.0]  # the outside ones, per channel
    # LSQ: code - u inside, the code outside: -1 + 0.5 - 0.4 - 0.2 + 1 + 0, over sqrt(6)
    assert float(scale.grad) == pytest.approx(-0.1 / math.sqrt(6), rel=1e-5)


def test_ternary_activations_of_a_relu_network_are_centred_and_use_all_three_levels():
    """A ReLU output never goes below 0, so a plain ternary input is 0 or +1 there; centred
    per channel (calibration: the channel means, s = 1.4 mean |x - c|) it takes all three."""
    calib = [torch.randn(64, 12) for _ in range(2)]
    sim = lowbit.quantize(_mlp(3), TERNARY2, calib, progress=False)
    q = sim[2].input_quantizer
    assert isinstance(q, CenteredSign) and q.ternary and "ternary centred" in repr(q)
    with torch.no_grad():
        h = sim[1](sim[0](calib[0]))
        assert float(h.min()) >= 0.0
        codes = lowbit.numerics.centred_codes(h, q.center, q.scale, ternary=True)
        assert set(codes.unique().tolist()) == {-1.0, 0.0, 1.0}
        mean_deviation = q.calibrator.deviation / q.calibrator.elements
        assert float(q.scale) == pytest.approx(1.4 * mean_deviation, rel=1e-6)
        assert torch.equal(q(h), q.center + q.scale * codes)


def test_a_plain_ternary_input_without_a_sign_is_named():
    """A ternary activation that is not centred (per channel: dynamic) on a ReLU output: a
    warning says its -1 level is never used."""
    spec = QuantSpec(bits=2, scheme="ternary", granularity=PerChannel(-1))
    config = QuantConfig(weight=presets.ternary().weight, input=spec)
    with pytest.warns(lowbit.LowbitWarning, match="the -1 level is never used"):
        sim = lowbit.quantize(_mlp(3), config, [torch.randn(8, 12)], progress=False)
    assert not isinstance(sim[2].input_quantizer, CenteredSign)


@pytest.mark.parametrize("config", [XNOR, TERNARY2])
def test_a_constant_input_is_left_float_with_a_warning(config):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
        model[0].bias.fill_(-1.0)  # every ReLU output 0: nothing to binarize
    with pytest.warns(lowbit.LowbitWarning, match="held one value throughout calibration"):
        qmodel = lowbit.quantize(model, config, [torch.randn(4, 6)], progress=False)
    assert qmodel[2].input_quantizer.mode == "off"


@pytest.mark.parametrize("config", [XNOR, TERNARY2])
def test_qat_without_calibration_data_names_the_way_out(config):
    qat = lowbit.prepare_qat(nn.Sequential(nn.Linear(4, 3)), config)
    assert isinstance(qat[0].input_quantizer, CenteredSign)
    with pytest.raises(RuntimeError, match="pass calib_data"):
        qat(torch.randn(2, 4))


def _mlp(depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(12, 12), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(12, 3))


def test_first_and_last_layers_follow_xnor_net_practice():
    calib = [torch.randn(8, 12)]
    records = lowbit.quantize(
        _mlp(4), presets.binary(xnor=True), calib, progress=False
    ).lowbit_summary.layers
    assert "int8" in records[0].detail and "first layer" in records[0].detail
    assert "int8" in records[-1].detail and "last layer" in records[-1].detail
    assert all("binary" in r.detail for r in records[1:-1])
    floats = lowbit.quantize(
        _mlp(4), presets.binary(xnor=True, ends="float"), calib, progress=False
    )
    assert [r.quantized for r in floats.lowbit_summary.layers] == [False, True, True, False]
    two = lowbit.quantize(_mlp(2), presets.binary(xnor=True), calib, progress=False)
    assert all("binary" in r.detail for r in two.lowbit_summary.layers)  # no ends in two layers
    with pytest.raises(ValueError, match="ends must be one of"):
        presets.ternary(ends="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activations must be 'float', 'int8' or 'ternary'"):
        presets.ternary("binary")  # type: ignore[arg-type]


def test_files_hold_one_bit_per_weight_and_load_back(tmp_path):
    calib = [torch.randn(4, 3, 9, 11) for _ in range(2)]
    converted = _quiet_convert(lowbit.quantize(_conv_net(), XNOR, calib, progress=False))
    assert converted[2].qweight.numel() == math.ceil(19 * 70 * 6 / 8)
    lowbit.save(converted, tmp_path / "xnor.lowbit")
    loaded = lowbit.load(tmp_path / "xnor.lowbit", _conv_net())
    assert isinstance(loaded[2], IntBinaryConv) and loaded[2].kernel == "xnor"
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converted(x), rtol=0, atol=0)


class _TinyXnor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_xnor_net_trained_by_qat_runs_on_bits_with_the_simulations_accuracy(digits):
    torch.manual_seed(0)
    qat = lowbit.prepare_qat(
        _TinyXnor(), presets.binary(xnor=True), demo.calibration_batches(digits, 2), progress=False
    )
    opt = torch.optim.Adam(qat.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    qat.train()
    for _ in range(2):
        order = torch.randperm(len(digits.x_train), generator=g)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(qat(digits.x_train[idx]), digits.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    qat.eval()
    converted = lowbit.convert(qat)
    assert converted.net[3].kernel == "xnor"
    with torch.no_grad():
        sim, bits = qat(digits.x_test).argmax(1), converted(digits.x_test).argmax(1)
    accuracy = float((bits == digits.y_test).float().mean() * 100)
    assert accuracy > 80.0  # two epochs of a tiny net; the benchmark trains the real one
    assert float((sim == bits).float().mean()) >= 0.99


@pytest.mark.parametrize("config", [XNOR, TERNARY2])
def test_onnx_export_of_an_xnor_model_runs_in_onnx_runtime(tmp_path, config):
    ort = pytest.importorskip("onnxruntime")
    calib = [torch.randn(4, 3, 9, 11) for _ in range(2)]
    sim = lowbit.quantize(_conv_net(), config, calib, progress=False)
    path = tmp_path / "xnor.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.export_onnx(sim, torch.randn(1, 3, 9, 11), path, opset=21)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 9, 11)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert _rel(torch.from_numpy(got), sim(x)) < 1e-5
