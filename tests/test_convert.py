"""lowbit.convert: integer modules agree with the simulation; quantize_dynamic, quantize_weights."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit import kernels, presets
from lowbit.cli import demo
from lowbit.config import LayerQuant, QuantConfig
from lowbit.kernels import compile as kernel_compile
from lowbit.kernels import dynamic, onednn_conv_available, weight_only
from lowbit.kernels.conv import onednn_conv_exact
from lowbit.nn import IntConv, IntEmbedding, IntLinear, IntModule, PerTokenQuantizer, int_linear
from lowbit.nn.int_binary import IntBinaryLinear
from lowbit.nn.modules import QuantModule
from lowbit.nn.padded_conv import ZeroPaddedConv2d
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.spec import PerChannel, PerGroup, QuantSpec
from lowbit.workflows.conversion import convert, int_modules, quantize_dynamic, quantize_weights
from lowbit.workflows.quantization import quantize

INPUT_SHAPES = [(5,), (1,), (0,), (2, 3)]  # leading dims: batch, batch of one, empty, 3-D


def _rel(a: Tensor, b: Tensor) -> float:
    if b.numel() == 0:
        assert a.shape == b.shape
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _calib(k: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, k, generator=g) for _ in range(2)]


def _convert_quiet(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model)


def _linear_model(k: int, n: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, n))


STATIC_CONFIGS = {
    "int8": (presets.int8, "int_mm"),
    "int8_asymmetric": (presets.int8_asymmetric, "int_mm"),  # uint8 inputs, zero point
    "w4a8_per_channel": (lambda: presets.w4a8(group_size=None), "int_mm"),
    "w4a8_group": (lambda: presets.w4a8(group_size=16), "dequantize"),
    "weight_only_int8": (presets.weight_only, "int8pack"),
    "weight_only_int16": (lambda: presets.weight_only(16), "dequantize"),
    "binary": (presets.binary, "bwn"),  # on bits (issue 20): lowbit.nn.int_binary
    "ternary": (presets.ternary, "ternary"),
}


@pytest.mark.parametrize("name", list(STATIC_CONFIGS))
@pytest.mark.parametrize("k,n", [(37, 19), (64, 48)])
def test_int_linear_matches_simulation(name, k, n):
    make_config, kernel = STATIC_CONFIGS[name]
    if name.endswith("group") and k % 16:
        k = 48  # groups must divide the inputs; the outputs (19) stay odd
    sim = quantize(_linear_model(k, n), make_config(), _calib(k), progress=False)
    int_model = _convert_quiet(sim)
    layer = int_model[0]
    assert isinstance(layer, IntLinear | IntBinaryLinear)
    assert layer.kernel == kernel
    g = torch.Generator().manual_seed(1)
    for lead in INPUT_SHAPES:
        x = torch.randn(*lead, k, generator=g)
        with torch.no_grad():
            expected, got = sim(x), int_model(x)
        assert got.shape == expected.shape
        assert _rel(got, expected) < 1e-4, (name, lead)


def test_int_mm_really_is_integer_exact():
    """The int_mm path equals a float64 evaluation of the integer formula."""
    sim = quantize(_linear_model(40, 24), presets.int8_asymmetric(), _calib(40), progress=False)
    layer = convert(sim)[0]
    x = torch.randn(7, 40)
    xq = (torch.round(x / layer.input_scale) + layer.input_zero_point).clamp(0, 255).double()
    w = layer.weight_codes().double()
    acc = (xq - float(layer.input_zero_point)) @ w.t()
    expected = acc * float(layer.input_scale) * layer.weight_scale.double() + layer.bias.double()
    assert _rel(layer(x).double(), expected) < 1e-6


def test_per_token_dynamic_linear_matches_simulation():
    torch.manual_seed(0)
    k, n = 45, 21
    lin = nn.Linear(k, n)
    wq = TensorQuantizer(presets.int8().weight)  # type: ignore[arg-type]
    wq.set_qparams_from(lin.weight)
    act = QuantSpec(bits=8, narrow_range=True, granularity=PerChannel(0))
    sim = nn.Sequential(QuantModule(lin, wq, PerTokenQuantizer(act)))
    int_model = convert(sim)
    assert int_model[0].kernel == "int_mm"
    for lead in INPUT_SHAPES:
        x = torch.randn(*lead, k) * torch.rand(*lead, 1) * 10  # rows of very different ranges
        with torch.no_grad():
            assert _rel(int_model(x), sim(x)) < 1e-4, lead


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_kernel_matches_dequantize_then_matmul(group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 48))
    q = quantize_weights(model, bits=4, group_size=group)
    layer = q[0]
    assert layer.kernel == "int4pack"
    x = torch.randn(2, 5, 256)
    reference = F.linear(x, layer.dequantized_weight(), layer.bias)
    assert _rel(layer(x), reference) < 1e-5
    assert layer(torch.randn(0, 256)).shape == (0, 48)


def test_int4_kernel_falls_back_when_its_constraints_fail():
    torch.manual_seed(0)
    for model, group in (
        (nn.Sequential(nn.Linear(64, 40)), 32),  # N not a multiple of 16
        (nn.Sequential(nn.Linear(64, 48)), 16),
    ):  # group < 32
        with pytest.warns(UserWarning, match="dequantize-then-float"):
            q = quantize_weights(model, bits=4, group_size=group)
        x = torch.randn(3, 64)
        assert q[0].kernel == "dequantize"
        assert _rel(q(x), F.linear(x, q[0].dequantized_weight(), q[0].bias)) < 1e-6


def test_qat_dynamic_and_learnable_weight_quantizers_convert():
    torch.manual_seed(0)
    lin = nn.Linear(30, 20)
    spec = presets.int8().weight
    assert spec is not None
    act = TensorQuantizer(QuantSpec(bits=8))
    act.set_qparams(torch.tensor(0.05), torch.tensor(0))
    for wq in (TensorQuantizer(spec, dynamic=True), TensorQuantizer(spec, learnable=True)):
        if wq.learnable:
            wq.set_qparams_from(lin.weight)
            with torch.no_grad():
                wq.scale.mul_(1.1)  # "trained" away from the abs-max scale
        sim = nn.Sequential(QuantModule(lin, wq, act))
        int_model = convert(sim)
        x = torch.randn(4, 30)
        with torch.no_grad():
            assert _rel(int_model(x), sim(x)) < 1e-4
        if wq.learnable:
            torch.testing.assert_close(int_model[0].weight_scale, wq.scale.detach())


class SamePadConv(nn.Conv2d):
    """Pads in its own forward, like EfficientNet's Conv2dStaticSamePadding."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (1, 2, 1, 2)))


def test_conv_and_embedding_fallbacks_match_simulation():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = SamePadConv(3, 8, 3)
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.conv1d = nn.Conv1d(4, 4, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            y = self.up(self.conv(x))
            return self.conv1d(y.flatten(2)).reshape(y.shape)

    net = Net()
    calib = [torch.randn(2, 3, 9, 9)]
    sim = quantize(net, presets.int8_asymmetric(), calib, progress=False)
    with pytest.warns(UserWarning, match="dequantize-then-float") as record:
        int_model = convert(sim)
    assert len(record) == 1
    assert all(name in str(record[0].message) for name in ("conv", "up", "conv1d"))
    assert isinstance(int_model.conv, IntConv) and isinstance(int_model.up, IntConv)
    assert isinstance(int_model.conv.module, SamePadConv)
    assert "weight" not in dict(int_model.conv.named_parameters(recurse=True))
    for x in (torch.randn(1, 3, 9, 9), torch.randn(0, 3, 9, 9), torch.randn(3, 3, 10, 11)):
        with torch.no_grad():
            assert _rel(int_model(x), sim(x)) < 1e-5

    emb = nn.Sequential(nn.Embedding(50, 12))
    sim_e = quantize(emb, presets.weight_only(4), [torch.arange(10)], progress=False)
    int_e = _convert_quiet(sim_e)
    assert isinstance(int_e[0], IntEmbedding) and int_e[0].qweight.dtype == torch.uint8
    idx = torch.tensor([[0, 5, 49], [3, 3, 1]])
    torch.testing.assert_close(int_e(idx), sim_e(idx), rtol=0, atol=0)


def test_binary_and_ternary_weights_are_packed():
    for make, bits in ((presets.binary, 1), (presets.ternary, 2)):
        sim = quantize(_linear_model(37, 19), make(), _calib(37), progress=False)
        layer = convert(sim)[0]
        assert layer.qweight.dtype == torch.uint8
        assert layer.qweight.numel() == -(-37 * 19 * bits // 8)


def test_convert_digits_keeps_accuracy_and_warns_once(digits, digits_net):
    batches = demo.calibration_batches(digits)
    sim = quantize(digits_net, presets.int8(), batches, progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        int_model = convert(sim)
    messages = [str(w.message) for w in record if "dequantize-then-float" in str(w.message)]
    # The convolutions run oneDNN's int8 convolution (lowbit.kernels.conv) where PyTorch has it
    # and it is exact (VNNI); elsewhere they are the only layers computed as
    # dequantize-then-float, listed once.
    if onednn_conv_available() and onednn_conv_exact(-127, 127):
        assert messages == []
        assert all(int_model.features[i].kernel == "onednn_qconv" for i in (0, 3, 6))
    else:
        assert len(messages) == 1
        assert all(f"features.{i}" in messages[0] for i in (0, 3, 6))
        assert "classifier" not in messages[0]
    assert int_model.classifier.kernel == "int_mm"
    assert int_model.lowbit_summary is sim.lowbit_summary
    with torch.no_grad():
        changed = (int_model(digits.x_test).argmax(1) != sim(digits.x_test).argmax(1)).sum()
    # Same integer sums, float rescales rounded differently: an activation moves by one step only
    # where it sits on a rounding boundary (a sample in a hundred or fewer) and a prediction only
    # where that moves the top logit below the next: 1 % of the samples bounds it.
    assert int(changed) <= len(digits.x_test) // 100
    assert not any(isinstance(m, QuantModule) for m in int_model.modules())
    assert any(isinstance(m, QuantModule) for m in sim.modules())  # not inplace


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 10)
    )


def test_quantize_dynamic_mlp():
    model = _mlp()
    dyn = quantize_dynamic(model)
    layers = int_modules(dyn)
    assert len(layers) == 3
    assert all(m.kernel == "int_mm" and m.qweight.dtype == torch.int8 for m in layers.values())
    assert all(m.input_mode == "per_token" for m in layers.values())
    x = torch.randn(2, 7, 128)
    with torch.no_grad():
        cos = F.cosine_similarity(dyn(x).flatten(), model(x).flatten(), dim=0)
    assert cos > 0.999
    assert dyn(torch.randn(0, 128)).shape == (0, 10)
    assert isinstance(model[0], nn.Linear)  # the float model is untouched


def test_quantize_dynamic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        quantize_dynamic(_mlp(), bits=4)
    with pytest.raises(ValueError, match="layers"):
        quantize_dynamic(_mlp(), layers=nn.Linear)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layers"):
        quantize_dynamic(_mlp(), layers=(nn.Conv2d,))
    with pytest.raises(ValueError, match="layers"):
        quantize_dynamic(_mlp(), layers=("Linear",))  # type: ignore[arg-type]


def test_quantize_weights_error_decreases_with_bits():
    model = _mlp()
    x = torch.randn(64, 128)
    with torch.no_grad():
        ref = model(x)
    errors = {}
    for bits, group in ((16, None), (8, None), (4, 32), (4, 128)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = quantize_weights(model, bits=bits, group_size=group)
        with torch.no_grad():
            errors[(bits, group)] = float((q(x) - ref).pow(2).mean() / ref.pow(2).mean())
        first = q[0]
        if bits == 4:
            assert first.qweight.dtype == torch.uint8
            assert first.qweight.numel() == 256 * 128 // 2
            assert first.weight_spec.granularity == PerGroup(group)
        else:
            assert first.qweight.dtype == {8: torch.int8, 16: torch.int16}[bits]
    assert q[0].kernel == "int4pack"
    assert q[4].kernel == "dequantize"  # 10 outputs: not a multiple of 16
    assert errors[(16, None)] < errors[(8, None)] < errors[(4, 32)] < 0.05
    assert errors[(4, 32)] < errors[(4, 128)] * 1.5


def test_quantize_weights_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        quantize_weights(_mlp(), bits=5)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weights(_mlp(), bits=4, group_size=0)
    with pytest.raises(ValueError, match="granularity"):
        quantize_weights(_mlp(), granularity="channel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layers"):
        quantize_weights(_mlp(), layers=[nn.Linear])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weights(_mlp(), bits=4, group_size=48)  # 128 inputs


def test_convert_rejects_uncalibrated_models():
    config = QuantConfig(
        overrides={nn.Linear: LayerQuant(weight=presets.int8().weight, input=QuantSpec(bits=8))}
    )
    from lowbit.transforms.swap import static_quantizers, swap_modules

    model = _mlp()
    swap_modules(model, config, static_quantizers(config))
    with pytest.raises(ValueError, match="calibrate"):
        convert(model)


def _record_kernels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each forward appends the kernel it ran, seen by the functions only that kernel calls."""
    ran: list[str] = []

    def spy(owner: object, name: str, kernel: str) -> None:
        fn = getattr(owner, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            ran.append(kernel)
            return fn(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    spy(dynamic, "dynamic_int8_linear", "int_mm")
    spy(int_linear, "_int_matmul", "int_mm")
    spy(weight_only, "linear_int8", "int8pack")
    spy(torch.ops.aten, "_weight_int8pack_mm", "int8pack")
    spy(weight_only, "linear_int4", "int4pack")
    spy(torch.ops.aten, "_weight_int4pack_mm_for_cpu", "int4pack")
    spy(kernels, "qconv2d", "onednn_qconv")
    spy(IntModule, "dequantized_weight", "dequantize")
    return ran


class PaddedThenScaled(nn.Conv2d):
    """Has a static zero padding, like Conv2dStaticSamePadding, but its forward does more."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.static_padding(x)) * 2


PaddedThenScaled.__name__ = "Conv2dStaticSamePadding"  # a name is no proof of a forward


def _kernel_layers() -> list[tuple[nn.Module, Tensor]]:
    torch.manual_seed(0)
    k, n = 64, 32  # int4: N % 16 == 0, groups of 32
    layers: list[tuple[nn.Module, Tensor]] = []
    x = torch.randn(3, k)
    sim = quantize(_linear_model(k, n), presets.int8(), _calib(k), progress=False)
    static = _convert_quiet(sim)
    layers.append((static[0], x))
    layers.append((quantize_dynamic(_linear_model(k, n))[0], x))
    layers.append((quantize_dynamic(_linear_model(k, n))[0], x.bfloat16()))
    for bits, group in ((8, None), (4, 32)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wo = quantize_weights(_linear_model(k, n), bits=bits, group_size=group)
        layers.append((wo[0], x))
    convs = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        ZeroPaddedConv2d(8, 8, 3, pad=(0, 1, 0, 1)),
        PaddedThenScaled(8, 4, 3),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
    )
    calib = [torch.randn(2, 3, 9, 9)]
    int_convs = _convert_quiet(quantize(convs, presets.int8(), calib, progress=False))
    xc = torch.randn(2, 3, 9, 9)
    for layer in int_convs:
        layers.append((layer, xc))
        with torch.no_grad():
            xc = layer(xc)
    return layers


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("vnni", [True, False])
def test_kernel_names_what_runs(compiled, vnni, monkeypatch):
    """`module.kernel` is the kernel its forward runs: on this CPU, without VNNI (as the
    kernel tests simulate), with lowbit's C++ kernels and without, and on another device
    (meta), where the weight-packed and oneDNN kernels do not run."""
    monkeypatch.setitem(kernel_compile._state, "enabled", compiled)
    if not vnni:
        monkeypatch.setattr(dynamic, "u8_gemm_safe", lambda: False)
    layers = _kernel_layers()
    kernels_seen = {layer.kernel for layer, _ in layers}
    assert {"int_mm", "int8pack", "int4pack", "dequantize"} <= kernels_seen
    int8_conv = onednn_conv_available() and onednn_conv_exact(-127, 127)
    assert layers[5][0].kernel == ("onednn_qconv" if int8_conv else "dequantize")
    assert layers[7][0].kernel == "dequantize"  # a static padding, but a forward of its own
    ran = _record_kernels(monkeypatch)
    for layer, x in layers:
        ran.clear()
        with torch.no_grad():
            layer(x)
        assert ran and set(ran) == {layer.kernel}, (type(layer).__name__, layer.kernel, ran)
    conv, xc = layers[5]
    ran.clear()
    with torch.no_grad():  # an unbatched [C, H, W] input runs the same kernel
        torch.testing.assert_close(conv(xc[0]), conv(xc)[0])
    assert set(ran) == {conv.kernel}
    for layer, x in layers[:5]:  # the Linear layers
        layer.to("meta")
        assert layer.kernel == ("int_mm" if layer.input_spec is not None else "dequantize")
        if layer.kernel == "dequantize":
            ran.clear()
            with torch.no_grad():
                assert layer(x.to("meta")).device.type == "meta"
            assert ran == ["dequantize"]


def test_int_linear_rejects_inputs_of_the_wrong_width():
    """(2, 384) into a 768-input layer holds 768 values: it must not be read as one row."""
    torch.manual_seed(0)
    layers = (
        quantize_dynamic(nn.Sequential(nn.Linear(768, 64)))[0],
        quantize_weights(nn.Sequential(nn.Linear(768, 64)), bits=8)[0],
        _convert_quiet(
            quantize(_linear_model(768, 64), presets.int8(), _calib(768), progress=False)
        )[0],
    )
    for layer in layers:
        for shape in ((2, 384), (1, 700), (3, 2, 384)):
            with pytest.raises(ValueError, match="768 features"):
                layer(torch.randn(*shape))


class _ReflectPadded(nn.Conv2d):
    """A 'SAME'-style conv whose static padding is not zeros and cannot run on a 1 x 1 probe."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ReflectionPad2d(1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding)


def test_conv_whose_padding_fails_the_probe_converts_to_its_own_forward():
    """Recognising a static 'SAME' padding runs the layer's modules on small probes; one that
    fails there is simply not recognised (it converted before the probe existed)."""
    from lowbit.export import reduce_range_config  # 7-bit weights: oneDNN's kernel on any x86

    torch.manual_seed(0)
    model = nn.Sequential(_ReflectPadded(3, 8, 3), nn.ReLU()).eval()
    config = reduce_range_config(presets.int8_asymmetric())
    qmodel = quantize(model, config, [torch.randn(4, 3, 9, 9)], progress=False)
    int_model = _convert_quiet(qmodel)
    assert int_model[0].kernel == "dequantize"
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert _rel(int_model(x), qmodel(x)) < 1e-4


@pytest.mark.skipif(not onednn_conv_available(), reason="no oneDNN in this torch")
def test_onednn_conv_refuses_other_ranks_with_the_layers_own_error():
    """A 2-D or 5-D input gets Conv2d's message, not one from inside the oneDNN kernel."""
    from lowbit.export import reduce_range_config  # 7-bit weights: oneDNN's kernel on any x86

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3)).eval()
    config = reduce_range_config(presets.int8_asymmetric())
    int_model = _convert_quiet(quantize(model, config, [torch.randn(4, 3, 9, 9)], progress=False))
    assert int_model[0].kernel == "onednn_qconv"
    for shape in ((3, 9), (1, 1, 3, 9, 9)):
        with pytest.raises(RuntimeError, match="Expected 3D"):
            int_model(torch.randn(*shape))


def test_packs_follow_a_reload_into_buffers_made_under_inference_mode():
    """Inference tensors keep no version counter: a load_state_dict into them must still drop
    the kernel layouts built from the old weights."""
    torch.manual_seed(0)
    with torch.inference_mode():
        one, two = (quantize_dynamic(nn.Sequential(nn.Linear(37, 50))) for _ in range(2))
        x = torch.randn(4, 37)
        assert one[0].qweight.is_inference()
        one(x)  # builds the packed weights
        one.load_state_dict(two.state_dict())
        torch.testing.assert_close(one(x), two(x), rtol=0, atol=0)
