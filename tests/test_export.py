"""ONNX QDQ export: file structure, agreement with the simulation in ORT and OpenVINO, errors."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from ort_reference import activation_code_flips
from torch import nn

from lowbit import presets
from lowbit.cli import demo
from lowbit.config import LayerQuant, QuantConfig
from lowbit.export import export_onnx, reduce_range_config
from lowbit.nn.modules import quant_modules
from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec
from lowbit.workflows.quantization import prepare_qat, quantize


@pytest.fixture(scope="module")
def qmodels(digits, digits_net) -> dict[str, nn.Module]:
    calib = demo.calibration_batches(digits)
    return {
        "int8": quantize(digits_net, presets.int8(), calib, progress=False),
        "int8_asymmetric": quantize(digits_net, presets.int8_asymmetric(), calib, progress=False),
    }


def _session(path: Path, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _simulate(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _logit_step(model: nn.Module) -> float:
    """The largest change of a logit when one classifier input moves by one quantization step."""
    layer = quant_modules(model)["classifier"]
    w = layer.quantized_weight().detach()
    assert layer.input_quantizer is not None
    step = float(layer.input_quantizer.scale)
    return step * float(w.abs().max())


def _producer(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


@pytest.mark.parametrize("preset", ["int8", "int8_asymmetric"])
def test_qdq_structure(qmodels, digits, tmp_path, preset):
    # int8() as traced (TensorRT's form); its ONNX Runtime form is tested with the targets below
    target = "tensorrt" if preset == "int8" else "onnxruntime"
    path = export_onnx(qmodels[preset], digits.x_test[:1], tmp_path / "m.onnx", target=target)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 13
    inits = {t.name: t for t in model.graph.initializer}
    producer = _producer(model)
    act_type = TensorProto.INT8 if preset == "int8" else TensorProto.UINT8
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(compute) == 4
    for node in compute:
        x_dq, w_dq = producer[node.input[0]], producer[node.input[1]]
        # activation: Q -> DQ directly before the input, per tensor, in the preset's type
        assert x_dq.op_type == "DequantizeLinear"
        assert producer[x_dq.input[0]].op_type == "QuantizeLinear"
        assert inits[x_dq.input[2]].data_type == act_type
        assert numpy_helper.to_array(inits[x_dq.input[1]]).ndim == 0
        # weight: integer initializer -> per-axis DQ (axis 0), no float copy left behind
        assert w_dq.op_type == "DequantizeLinear"
        codes = inits[w_dq.input[0]]
        assert codes.data_type == TensorProto.INT8
        assert numpy_helper.to_array(inits[w_dq.input[1]]).ndim == 1
        assert next(a.i for a in w_dq.attribute if a.name == "axis") == 0
        assert np.abs(numpy_helper.to_array(codes)).max() <= 127  # narrow range kept
    assert not any(
        t.data_type == TensorProto.FLOAT and t.name.endswith("weight")
        for t in model.graph.initializer
    )


@pytest.mark.parametrize("preset", ["int8", "int8_asymmetric"])
def test_ort_matches_the_simulation(qmodels, digits, tmp_path, preset):
    qmodel = qmodels[preset]
    path = export_onnx(qmodel, digits.x_test[:1], tmp_path / "m.onnx")
    x = digits.x_test
    ref = _simulate(qmodel, x)
    # The plain Q/DQ kernels compute what the simulation computes, up to float summation order,
    # which can move a value on a rounding boundary by one step (checked to be just that).
    out = _session(path, optimize=False).run(None, {"input": x.numpy()})[0]
    assert out.shape == ref.shape  # the batch dimension is dynamic
    flipped = activation_code_flips(path, qmodel, x)
    np.testing.assert_allclose(out[~flipped], ref[~flipped], atol=1e-4)
    # ORT's fused integer kernels requantize with their own rounding, which moves a few
    # activations by one step: a few logit steps at most.
    out = _session(path).run(None, {"input": x.numpy()})[0]
    assert np.abs(out - ref).max() <= 8 * _logit_step(qmodel)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99


def test_weights_are_bit_exact(qmodels, digits, tmp_path):
    qmodel = qmodels["int8"]
    model = onnx.load(export_onnx(qmodel, digits.x_test[:1], tmp_path / "m.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, layer in quant_modules(qmodel).items():
        codes = inits[f"{name}.weight_quantized"].astype(np.float32)
        scale = inits[f"{name}.weight_scale"].reshape(-1, *[1] * (codes.ndim - 1))
        expected = layer.quantized_weight().detach().numpy()
        np.testing.assert_array_equal(codes * scale, expected)


def test_int4_weight_only_at_opset_21(digits, digits_net, tmp_path):
    linear_only = QuantConfig(
        weight=QuantSpec(bits=4, granularity=PerChannel(0)),
        overrides={nn.Linear: LayerQuant(weight=QuantSpec(bits=4, granularity=PerGroup(32)))},
    )
    qmodel = quantize(digits_net, linear_only, demo.calibration_batches(digits), progress=False)
    path = export_onnx(qmodel, digits.x_test[:1], tmp_path / "w4.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 21
    int4 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT4]
    assert len(int4) == 8  # codes and zero points of 4 layers
    blocked = [n for n in model.graph.node if any(a.name == "block_size" for a in n.attribute)]
    assert [n.name for n in blocked] == ["classifier.weight/DequantizeLinear"]
    out = _session(path).run(None, {"input": digits.x_test.numpy()})[0]
    np.testing.assert_allclose(out, _simulate(qmodel, digits.x_test), atol=1e-4, rtol=1e-4)


def test_reduce_range(digits, digits_net, qmodels, tmp_path):
    config = reduce_range_config(presets.int8_asymmetric())
    assert config.weight is not None and config.weight.bits == 7
    qmodel = quantize(digits_net, config, demo.calibration_batches(digits), progress=False)
    path = export_onnx(qmodel, digits.x_test[:1], tmp_path / "r.onnx", reduce_range=True)
    model = onnx.load(path)
    codes = [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.name.endswith("weight_quantized")
    ]
    assert len(codes) == 4
    assert all(c.dtype == np.int8 and c.min() >= -64 and c.max() <= 63 for c in codes)
    out = _session(path).run(None, {"input": digits.x_test.numpy()})[0]
    ref = _simulate(qmodel, digits.x_test)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99
    # an 8-bit model cannot be exported with reduce_range: the file would not match it
    with pytest.raises(ValueError, match=r"features\.0.*reduce_range_config"):
        export_onnx(qmodels["int8"], digits.x_test[:1], tmp_path / "bad.onnx", reduce_range=True)
    assert not (tmp_path / "bad.onnx").exists()


class _PadConv(nn.Conv2d):
    """EfficientNet's Conv2dStaticSamePadding in small: pad with F.pad, then convolve."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, (0, 1, 0, 1))
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


def test_subclassed_padding_depthwise_conv(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), _PadConv(8, 8, 3, stride=2, groups=8))
    calib = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    qmodel = quantize(net, presets.int8_asymmetric(), calib, progress=False)
    path = export_onnx(qmodel, calib[0][:1], tmp_path / "pad.onnx")
    model = onnx.load(path)
    producer = _producer(model)
    assert not [n for n in model.graph.node if n.op_type == "Pad"]  # folded into the Conv
    conv = [n for n in model.graph.node if n.op_type == "Conv"][1]
    assert producer[conv.input[0]].op_type == "DequantizeLinear"  # Q/DQ directly before it
    pads = next(a for a in conv.attribute if a.name == "pads")
    assert list(pads.ints) == [0, 0, 1, 1]  # F.pad's (left 0, right 1, top 0, bottom 1)
    x = torch.randn(4, 3, 12, 12)
    out = _session(path).run(None, {"input": x.numpy()})[0]
    step = float(quant_modules(qmodel)["2"].input_quantizer.scale)
    assert np.abs(out - _simulate(qmodel, x)).max() <= 0.05 + 4 * step


@pytest.mark.parametrize("opset", [13, 18, 20])
def test_zero_pads_fold_at_every_opset(tmp_path, opset):
    """The exporter writes the pad amounts as constant arithmetic of its opset (Slice, Cast):
    folded at that opset, not 13, or the Pad stays between the Q/DQ pair and the Conv."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), _PadConv(8, 8, 3, stride=2, groups=8))
    calib = [torch.randn(8, 3, 12, 12)]
    qmodel = quantize(net, presets.int8_asymmetric(), calib, progress=False)
    model = onnx.load(export_onnx(qmodel, calib[0][:1], tmp_path / "pad.onnx", opset=opset))
    assert model.opset_import[0].version == opset
    assert not [n for n in model.graph.node if n.op_type == "Pad"]


class _PadModeConv(nn.Conv2d):
    """Pads with F.pad in a given mode on top of the conv's own padding."""

    def __init__(self, mode: str) -> None:
        super().__init__(4, 4, 3, padding=1)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (2, 0, 1, 3), mode=self.mode))


@pytest.mark.parametrize(("mode", "folded"), [("constant", True), ("reflect", False)])
def test_only_zero_pads_fold_into_the_conv(tmp_path, mode, folded):
    torch.manual_seed(0)
    net = nn.Sequential(_PadModeConv(mode))
    calib = [torch.randn(4, 4, 9, 9)]
    qmodel = quantize(net, presets.int8_asymmetric(), calib, progress=False)
    path = export_onnx(qmodel, calib[0][:1], tmp_path / "pad.onnx")
    nodes = onnx.load(path).graph.node
    conv = next(n for n in nodes if n.op_type == "Conv")
    pads = list(next(a for a in conv.attribute if a.name == "pads").ints)
    assert any(n.op_type == "Pad" for n in nodes) != folded
    assert pads == ([2, 3, 4, 1] if folded else [1, 1, 1, 1])  # own 1 + F.pad (top 1, left 2...)
    x = torch.randn(2, 4, 9, 9)
    out = _session(path).run(None, {"input": x.numpy()})[0]
    step = float(quant_modules(qmodel)["0"].input_quantizer.scale)
    assert np.abs(out - _simulate(qmodel, x)).max() <= 4 * step


def _set_spec(model: nn.Module, name: str, role: str, spec: QuantSpec) -> None:
    getattr(quant_modules(model)[name], f"{role}_quantizer").spec = spec


@pytest.mark.parametrize(
    ("role", "spec", "error", "match"),
    [
        (
            "weight",
            QuantSpec(bits=4, scheme="log2", granularity=PerChannel(0)),
            NotImplementedError,
            "log2",
        ),
        ("input", QuantSpec(bits=1, scheme="binary"), NotImplementedError, "binary"),
        ("input", QuantSpec(bits=8, granularity=PerGroup(4)), NotImplementedError, "PerGroup"),
        ("input", QuantSpec(bits=6, granularity=PerTensor()), NotImplementedError, "6-bit"),
    ],
)
def test_unexportable_constructs_name_the_module(
    qmodels, digits, tmp_path, role, spec, error, match
):
    qmodel = copy.deepcopy(qmodels["int8"])
    _set_spec(qmodel, "features.3", role, spec)
    with pytest.raises(error, match=rf"features\.3.*{role} quantizer.*{match}"):
        export_onnx(qmodel, digits.x_test[:1], tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_dynamic_activation_quantizer_is_rejected(qmodels, digits, tmp_path):
    qmodel = qmodels["int8"]
    quantizer = quant_modules(qmodel)["classifier"].input_quantizer
    quantizer.dynamic = True
    try:
        with pytest.raises(NotImplementedError, match=r"classifier.*input quantizer.*dynamic"):
            export_onnx(qmodel, digits.x_test[:1], tmp_path / "bad.onnx")
    finally:
        quantizer.dynamic = False


def test_bad_arguments(qmodels, digits_net, digits, tmp_path):
    with pytest.raises(ValueError, match="no quantized layer"):
        export_onnx(digits_net, digits.x_test[:1], tmp_path / "f.onnx")
    with pytest.raises(ValueError, match="opset must be 13"):
        export_onnx(qmodels["int8"], digits.x_test[:1], tmp_path / "f.onnx", opset=11)
    with pytest.raises(TypeError, match="example_inputs"):
        export_onnx(qmodels["int8"], [1.0], tmp_path / "f.onnx")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_the_old_file_on_failure(qmodels, digits, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("lowbit.export.onnx.os.replace", broken)  # fails after the write
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(qmodels["int8"], digits.x_test[:1], path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_export_restores_the_model(qmodels, digits, tmp_path):
    qmodel = qmodels["int8_asymmetric"]
    before = _simulate(qmodel, digits.x_test[:32])
    state = {k: v.clone() for k, v in qmodel.state_dict().items()}
    export_onnx(qmodel, digits.x_test[:1], tmp_path / "m.onnx")
    np.testing.assert_array_equal(_simulate(qmodel, digits.x_test[:32]), before)
    assert qmodel.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in qmodel.state_dict().items())


@pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason="OpenVINO is not installed (pip install openvino)",
)
def test_openvino_runs_the_export(qmodels, digits, tmp_path):
    import openvino as ov

    qmodel = qmodels["int8_asymmetric"]
    path = export_onnx(qmodel, digits.x_test[:1], tmp_path / "m.onnx")
    compiled = ov.Core().compile_model(str(path), "CPU")
    out = compiled(digits.x_test.numpy())[0]
    ref = _simulate(qmodel, digits.x_test)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99
    # OpenVINO's int8 kernels requantize with their own rounding, like ORT's fused kernels
    assert np.abs(out - ref).max() <= 16 * _logit_step(qmodel)


def test_ternary_and_qat_weights_export_exactly(digits, digits_net, tmp_path):
    calib = demo.calibration_batches(digits, 2)
    ternary = quantize(digits_net, presets.ternary(), calib, progress=False)
    qat = prepare_qat(digits_net, presets.int8_asymmetric(), calib, progress=False).eval()
    for name, qmodel in [("ternary", ternary), ("qat", qat)]:
        path = export_onnx(qmodel, digits.x_test[:1], tmp_path / f"{name}.onnx")
        model = onnx.load(path)
        # ternary codes {-1, 0, 1} fit INT4 (opset 21); QAT weight scales come from the weight
        assert model.opset_import[0].version == (21 if name == "ternary" else 13)
        out = _session(path, optimize=False).run(None, {"input": digits.x_test.numpy()})[0]
        # Samples where float rounding moved an activation across a rounding boundary (checked
        # to be just that) differ by its consequences; every other one to float rounding.
        flipped = activation_code_flips(path, qmodel, digits.x_test)
        ref = _simulate(qmodel, digits.x_test)
        np.testing.assert_allclose(out[~flipped], ref[~flipped], atol=1e-4)


def test_code_flip_check_catches_a_wrong_export(qmodels, digits, tmp_path):
    """The ORT comparison above lets a sample differ only through a rounding-boundary flip: an
    activation scale 1 % off in the file is caught."""
    path = export_onnx(qmodels["int8_asymmetric"], digits.x_test[:1], tmp_path / "m.onnx")
    model = onnx.load(path)
    scale = next(t for t in model.graph.initializer if t.name == "features.6.input_scale")
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.01, scale.name))
    onnx.save(model, tmp_path / "wrong.onnx")
    with pytest.raises(AssertionError, match=r"features\.6"):
        activation_code_flips(tmp_path / "wrong.onnx", qmodels["int8_asymmetric"], digits.x_test)
