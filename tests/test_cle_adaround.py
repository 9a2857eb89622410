"""Cross-layer equalization, bias correction, AdaRound and auto_quantize, each against its
defining property: CLE leaves the float function unchanged, bias correction removes the mean
output shift, AdaRound beats rounding to nearest on layer output error, auto_quantize meets its
accuracy budget."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import numerics, presets
from lowbit.algorithms.adaround import adaround
from lowbit.algorithms.bias_correction import bias_correction
from lowbit.algorithms.cle import equalize
from lowbit.cli import demo
from lowbit.config import LayerQuant, QuantConfig
from lowbit.evaluate.mixed_precision import auto_quantize
from lowbit.nn.modules import quant_modules
from lowbit.spec import PerChannel, PerTensor, QuantSpec
from lowbit.transforms.fold_bn import fold_batchnorm
from lowbit.workflows.quantization import quantize


class _MobileBlock(nn.Module):
    """conv -> BN -> ReLU6 -> depthwise -> BN -> relu6 (functional) -> conv, wired in forward
    like EfficientNet: one shared activation module, a functional call, a residual path."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 12, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.project = nn.Conv2d(12, 4, 1)
        self.act = nn.ReLU6()
        self.head = nn.Conv2d(4, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn0(self.expand(x)))
        y = F.relu6(self.bn1(self.dw(y)))
        y = self.project(y) + x  # the residual: project's output is read twice
        return self.head(self.act(y))


def _block(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _MobileBlock()
    with torch.no_grad():
        # Uneven per-channel scales, as BN folding produces: the case CLE exists for.
        for bn in (model.bn0, model.bn1):
            bn.weight.copy_(torch.logspace(-1.5, 0.5, bn.num_features)[torch.randperm(12)])
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.uniform_(0.0, 0.3)
    return model.eval()


def _output_ranges(conv: nn.Module) -> torch.Tensor:
    return conv.weight.detach().abs().reshape(conv.weight.shape[0], -1).amax(1)


def test_cle_keeps_float_outputs_and_evens_out_depthwise_ranges():
    model = _block()
    data = [torch.randn(8, 4, 6, 6) for _ in range(3)]
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, lambda m: m(data[0]))
    eq = equalize(model, data, progress=False)
    report = eq.lowbit_equalization
    found = {(p.first, p.second) for p in report.pairs}
    assert found == {("expand", "dw"), ("dw", "project")}  # project feeds a residual: no pair
    with torch.no_grad():
        for x in data:
            torch.testing.assert_close(eq(x), model(x), rtol=1e-5, atol=1e-5)
    ratio = lambda m: float(_output_ranges(m).max() / _output_ranges(m).min())  # noqa: E731
    assert ratio(eq.dw) < 0.5 * ratio(folded.dw)
    assert isinstance(model.bn0, nn.BatchNorm2d)  # the input model is untouched


def test_cle_relu_chain_is_exact_on_any_input(digits_net, digits):
    eq = equalize(digits_net, demo.calibration_batches(digits), progress=False)
    assert len(eq.lowbit_equalization.pairs) == 2
    with torch.no_grad():
        x = torch.randn(16, 1, 8, 8) * 3  # far outside the calibration data: ReLU is exact
        torch.testing.assert_close(eq(x), digits_net(x), rtol=1e-4, atol=1e-4)
        a, b = _output_ranges(eq.features[3]), _output_ranges(eq.features[0])
    assert float(a.max() / a.min()) < 3.0 and float(b.max() / b.min()) < 3.0


def test_cle_relu6_skip_mode_and_bad_inputs(digits_net, digits):
    model = _block()
    data = [torch.randn(4, 4, 6, 6)]
    skipped = equalize(model, data, relu6="skip", progress=False)
    assert not skipped.lowbit_equalization.pairs
    assert len(skipped.lowbit_equalization.skipped) == 2
    with pytest.raises(ValueError, match="relu6"):
        equalize(model, data, relu6="clip", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="iterations"):
        equalize(model, data, iterations=0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        equalize(model, [], progress=False)
    with pytest.raises(ValueError, match="NaN"):
        equalize(model, [torch.full((2, 4, 6, 6), float("nan"))], progress=False)
    qmodel = quantize(digits_net, presets.int8(), demo.calibration_batches(digits), progress=False)
    with pytest.raises(TypeError, match="float model"):
        equalize(qmodel, data, progress=False)


def test_cle_skips_pairs_per_channel_weights_cannot_use():
    model = _block()
    data = [torch.randn(8, 4, 6, 6) for _ in range(2)]
    per_channel = equalize(model, data, config=presets.int8(), progress=False)
    report = per_channel.lowbit_equalization
    assert not report.pairs
    assert {(a, b) for a, b, _ in report.skipped} == {("expand", "dw"), ("dw", "project")}
    assert all("per output channel" in why for _, _, why in report.skipped)
    with torch.no_grad():
        torch.testing.assert_close(per_channel.dw.weight, _folded(model, data).dw.weight)
    per_tensor = presets.int8()
    per_tensor = replace(
        per_tensor,
        weight=per_tensor.weight.with_(granularity=PerTensor()),
        overrides={"expand": None},  # kept in float: nothing to even out
    )
    eq = equalize(model, data, config=per_tensor, progress=False)
    assert [(p.first, p.second) for p in eq.lowbit_equalization.pairs] == [("dw", "project")]
    assert "stays in float" in str(eq.lowbit_equalization)
    with torch.no_grad():
        torch.testing.assert_close(eq(data[0]), model(data[0]), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="config"):
        equalize(model, data, config={}, progress=False)  # type: ignore[arg-type]


def _folded(model: nn.Module, data: list[torch.Tensor]) -> nn.Module:
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, lambda m: m(data[0]))
    return folded


def _linear_w4(out_features: int, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """A Linear layer and its per-tensor 4-bit quantization (float inputs): a large weight error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], out_features)).eval()
    config = QuantConfig(weight=QuantSpec(bits=4, granularity=PerTensor()))
    return model, quantize(model, config, [x], progress=False)


def test_bias_correction_adds_the_weight_error_times_the_input_mean():
    torch.manual_seed(1)
    x = 0.01 * torch.randn(64, 16) + torch.linspace(-1, 2, 16)  # a mean far above the noise
    model, qmodel = _linear_w4(8, x)
    layer = quant_modules(qmodel)["0"]
    error = (model[0].weight - layer.quantized_weight()).double().detach()
    expected = model[0].bias.double().detach() + error @ x.double().mean(0)  # float64 formula
    bias_correction(qmodel, [x[:32], x[32:]], progress=False)
    torch.testing.assert_close(layer.module.bias.double().detach(), expected, rtol=0, atol=1e-4)
    report = qmodel.lowbit_bias_correction
    assert report.corrected == ("0",) and report.samples == 64
    assert report.layers[0].held_out > 0.99


def test_bias_correction_skips_a_shift_that_is_noise():
    """Zero-mean inputs: the true shift E[(W - W~) x] is zero, and what a sample set shows is
    noise, which the unchecked correction added to the bias. The held-out check is statistical:
    it rejects most such draws."""
    rejected = 0
    for seed in range(5):
        torch.manual_seed(seed)
        x = torch.randn(64, 32)
        model, qmodel = _linear_w4(64, x)
        error = (model[0].weight - quant_modules(qmodel)["0"].quantized_weight()).detach()
        assert (error @ x.mean(0)).abs().max() > 0.01  # the noise
        bias_correction(qmodel, [x], progress=False)
        (outcome,) = qmodel.lowbit_bias_correction.layers
        if not outcome.corrected:
            rejected += 1
            assert outcome.held_out <= 0 and outcome.max_shift == 0
            assert torch.equal(quant_modules(qmodel)["0"].module.bias, model[0].bias)
            assert "skipped 0: the correction does not reduce" in str(qmodel.lowbit_bias_correction)
    assert rejected >= 4


def _residual_shifts(qmodel: nn.Module, originals: dict[str, nn.Module], x: torch.Tensor):
    """Per layer, the largest |mean over samples and positions| of the original float layer's
    output minus the quantized layer's, on the input the quantized layer receives."""
    shifts: dict[str, float] = {}

    def hook(name: str):
        def record(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            diff = (originals[name](args[0]) - out).double()
            diff = diff.movedim(-1 if diff.dim() == 2 else 1, 0).flatten(1)
            shifts[name] = float(diff.mean(1).abs().max())

        return record

    layers = quant_modules(qmodel)
    handles = [layers[n].module.register_forward_hook(hook(n)) for n in originals]
    with torch.no_grad():
        qmodel(x)
    for h in handles:
        h.remove()
    return shifts


def test_bias_correction_removes_the_mean_output_shift(digits_net, digits):
    calib = demo.calibration_batches(digits)
    qmodel = quantize(digits_net, presets.w4a8(group_size=None), calib, progress=False)
    originals = {n: copy.deepcopy(m.module) for n, m in quant_modules(qmodel).items()}
    x = torch.cat(calib)
    before = _residual_shifts(qmodel, originals, x)
    assert min(before.values()) > 1e-3
    with pytest.raises(ValueError, match="at least 4 samples"):
        bias_correction(qmodel, [calib[0][:3]], progress=False)
    report = bias_correction(qmodel, calib, progress=False).lowbit_bias_correction
    assert quant_modules(qmodel)["features.0"].module.bias is not None  # created
    assert report.corrected == tuple(originals)
    after = _residual_shifts(qmodel, originals, x)
    for name in originals:
        assert after[name] < 0.05 * before[name], name
    with pytest.raises(ValueError, match="already bias-corrected"):
        bias_correction(qmodel, calib, progress=False)
    with pytest.raises(ValueError, match="no quantized layers"):
        bias_correction(digits_net, calib, progress=False)


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2, padding=1)
    ).eval()


def test_adaround_beats_nearest_rounding_on_layer_output():
    model = _conv_model()
    torch.manual_seed(1)
    calib = [torch.randn(16, 3, 12, 12) for _ in range(2)]
    config = QuantConfig(weight=QuantSpec(bits=4, granularity=PerChannel(0)))
    rtn = quantize(model, config, calib, progress=False)
    ada = adaround(copy.deepcopy(rtn), calib, iterations=300, progress=False)
    x = torch.cat(calib)
    with torch.no_grad():
        ref = model[2](model[1](model[0](x)))  # float output of the last layer, float input
        inp_rtn = rtn[1](rtn[0](x))
        inp_ada = ada[1](ada[0](x))
        err_rtn = (rtn[2](inp_rtn) - model[2](inp_rtn)).pow(2).mean()
        err_ada = (ada[2](inp_ada) - model[2](inp_ada)).pow(2).mean()
        end_rtn, end_ada = (rtn(x) - ref).pow(2).mean(), (ada(x) - ref).pow(2).mean()
    assert err_ada < 0.8 * err_rtn
    assert end_ada < end_rtn
    for name in ("0", "2"):
        q_rtn, q_ada = quant_modules(rtn)[name], quant_modules(ada)[name]
        wq = q_ada.weight_quantizer
        codes_rtn = numerics.quantize(
            model.get_submodule(name).weight, wq.scale, wq.zero_point, wq.spec
        )
        codes_ada = numerics.quantize(q_ada.module.weight, wq.scale, wq.zero_point, wq.spec)
        assert (codes_ada.int() - codes_rtn.int()).abs().max() <= 1
        assert (codes_ada != codes_rtn).any()
        torch.testing.assert_close(wq.scale, q_rtn.weight_quantizer.scale)  # scales unchanged
        # The weight is its dequantized codes: the quantizer reproduces it exactly.
        assert torch.equal(q_ada.quantized_weight(), q_ada.module.weight)
    report = ada.lowbit_adaround
    assert all(r.mse_adaround <= r.mse_nearest for r in report.layers)


def test_adaround_with_quantized_inputs_and_bad_inputs(digits_net, digits):
    calib = demo.calibration_batches(digits)
    config = presets.w4a8(group_size=None)
    config = replace(config, weight=config.weight.with_(granularity=PerChannel(0)))
    qmodel = quantize(digits_net, config, calib, progress=False)
    before = demo.accuracy(qmodel, digits.x_test, digits.y_test)
    adaround(qmodel, calib, iterations=200, progress=False)
    after = demo.accuracy(qmodel, digits.x_test, digits.y_test)
    assert after >= before - 1.0
    assert len(qmodel.lowbit_adaround.layers) == 4
    with pytest.raises(ValueError, match="no quantized layers"):
        adaround(digits_net, calib, progress=False)
    with pytest.raises(ValueError, match="iterations"):
        adaround(qmodel, calib, iterations=0, progress=False)
    binary = quantize(digits_net, presets.binary(), calib, progress=False)
    with pytest.raises(ValueError, match="no layer AdaRound can optimize"):
        adaround(binary, calib, progress=False)
    with pytest.raises(ValueError, match="empty"):
        adaround(qmodel, [], progress=False)


def test_auto_quantize_meets_budget_by_keeping_layers(digits_net, digits, digits_fp32):
    calib = demo.calibration_batches(digits)
    config = QuantConfig(
        weight=QuantSpec(bits=2, granularity=PerChannel(0)),
        input=QuantSpec(bits=8, narrow_range=True),
    )
    harsh = quantize(digits_net, config, calib, progress=False)
    assert demo.accuracy(harsh, digits.x_test, digits.y_test) < digits_fp32 - 5

    def eval_fn(m: nn.Module) -> float:
        return demo.accuracy(m, digits.x_test, digits.y_test)

    mixed = auto_quantize(digits_net, config, calib, eval_fn, max_drop=1.0, progress=False)
    summary = mixed.lowbit_auto
    assert summary.meets_budget
    assert eval_fn(mixed) >= digits_fp32 - 1.0
    assert 1 <= len(summary.kept) < summary.quantized_layers
    assert summary.steps[0].kept == () and not summary.steps[0].meets_budget
    assert {n for n, _ in summary.sensitivity} == set(quant_modules(harsh))
    kept = dict(summary.kept)
    for name, layer in quant_modules(mixed).items():
        bits = layer.weight_quantizer.spec.bits
        assert bits == (8 if name in kept else 2)
    assert "kept" in str(summary)


def test_auto_quantize_bad_inputs(digits_net, digits):
    calib = demo.calibration_batches(digits)
    config = presets.int8()
    with pytest.raises(TypeError, match="eval_fn"):
        auto_quantize(digits_net, config, calib, eval_fn=None, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_drop"):
        auto_quantize(digits_net, config, calib, lambda m: 1.0, max_drop=-1, progress=False)
    with pytest.raises(TypeError, match="QuantConfig"):
        auto_quantize(digits_net, {}, calib, lambda m: 1.0, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="candidates"):
        auto_quantize(digits_net, config, calib, lambda m: 1.0, candidates=(), progress=False)
    with pytest.raises(ValueError, match="finite accuracy"):
        auto_quantize(digits_net, config, calib, lambda m: float("nan"), progress=False)
    # A budget already met: nothing kept, one evaluation of the quantized model.
    fp32 = LayerQuant()
    assert fp32.weight is None
    easy = auto_quantize(digits_net, config, calib, lambda m: 50.0, progress=False)
    assert easy.lowbit_auto.kept == () and len(easy.lowbit_auto.steps) == 1
