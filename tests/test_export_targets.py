"""ONNX export targets: the same numbers in each runtime's fast form (uint8 codes and clips moved
after the Q for ONNX Runtime, int8 zero point 0 for OpenVINO and TensorRT)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from ort_reference import activation_code_flips
from test_export import _session, _simulate
from test_fusable_outputs import ResidualNet
from torch import nn

from lowbit import presets
from lowbit.config import QuantConfig
from lowbit.export import export_onnx, reduce_range_config
from lowbit.kernels.dynamic import u8_gemm_safe
from lowbit.nn.modules import quant_modules
from lowbit.workflows.quantization import quantize


def _residual(config: QuantConfig) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    calib = [torch.randn(8, 3, 10, 10) for _ in range(2)]
    qmodel = quantize(ResidualNet(), config, calib, progress=False)
    return qmodel, torch.randn(16, 3, 10, 10)


@pytest.fixture(scope="module")
def residual_int8() -> tuple[nn.Module, torch.Tensor]:
    return _residual(presets.int8())


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` (to read Q codes)."""
    model = copy.deepcopy(model)
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return model


def _activation_codes(model: onnx.ModelProto) -> list[str]:
    """The tensors that DequantizeLinear reads from a QuantizeLinear (possibly through a Clip
    of the codes): the activations' integer codes."""
    quantized = {n.output[0] for n in model.graph.node if n.op_type in ("QuantizeLinear", "Clip")}
    return [
        n.input[0]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized
    ]


def test_onnxruntime_target_moves_int8_codes_by_128_and_no_value(residual_int8, tmp_path):
    from onnx.reference import ReferenceEvaluator

    qmodel, x = residual_int8
    # opset 19: the oldest onnx.reference implements DequantizeLinear at
    ort_form = onnx.load(export_onnx(qmodel, x[:1], tmp_path / "ort.onnx", opset=19))
    trt_form = onnx.load(
        export_onnx(qmodel, x[:1], tmp_path / "trt.onnx", opset=19, target="tensorrt")
    )
    codes = _activation_codes(trt_form)
    # 9: the inputs and outputs of the layers, and the residual add's output (presets.int8())
    assert sorted(codes) == sorted(_activation_codes(ort_form)) and len(codes) == 9
    feeds = {"input": x.numpy()}
    runs = {}
    for name, model in (("ort", ort_form), ("trt", trt_form)):
        outs = ReferenceEvaluator(_with_outputs(model, codes)).run(None, feeds)
        runs[name] = dict(zip(["output", *codes], outs, strict=True))
    for code in codes:
        assert runs["ort"][code].dtype == np.uint8 and runs["trt"][code].dtype == np.int8
        shifted = runs["trt"][code].astype(np.int16) + 128
        np.testing.assert_array_equal(runs["ort"][code].astype(np.int16), shifted)
    # the same dequantized values: outputs equal to float rounding, in onnx.reference and ORT
    ref = runs["trt"]["output"]
    np.testing.assert_allclose(runs["ort"]["output"], ref, rtol=1e-5, atol=1e-5)
    out = _session(tmp_path / "ort.onnx", optimize=False).run(None, feeds)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # against the simulation: the same arithmetic summed in another order can move an activation
    # that lies on a rounding boundary by one step; activation_code_flips checks that any code ORT
    # computes differently is just that, and only such samples are left out (none on the CPUs
    # measured so far)
    flipped = activation_code_flips(tmp_path / "ort.onnx", qmodel, x)
    assert flipped.mean() <= 0.25
    np.testing.assert_allclose(out[~flipped], _simulate(qmodel, x)[~flipped], rtol=1e-5, atol=1e-5)


def _optimized_ops(path: Path, tmp_path: Path) -> list[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("reduce_range", [False, True])
def test_onnxruntime_target_runs_every_conv_as_qlinearconv(residual_int8, tmp_path, reduce_range):
    # without VNNI, ORT's u8 x s8 kernels add pairs of products in saturating int16
    # (255 * 127 * 2 > 32767): full 8-bit weights are exact only with VNNI, 7-bit ones everywhere
    if not reduce_range and not u8_gemm_safe():
        pytest.skip("8-bit weights in QLinearConv saturate without VNNI; reduce_range covers it")
    # int8(): symmetric activations, ReLU6 / ReLU before them
    qmodel, x = _residual(reduce_range_config(presets.int8())) if reduce_range else residual_int8
    # the default target: onnxruntime
    path = export_onnx(qmodel, x[:1], tmp_path / "m.onnx", reduce_range=reduce_range)
    assert {p.key: p.value for p in onnx.load(path).metadata_props}[
        "lowbit.target"
    ] == "onnxruntime"
    ops = _optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 4
    assert not {"Conv", "FusedConv", "NchwcConv"} & set(ops)
    # the classifier (float logits): its bias moved after it, so ORT runs it as QGemm too
    assert ops.count("QGemm") == 1 and "Gemm" not in ops
    out = _session(path).run(None, {"input": x.numpy()})[0]
    ref = _simulate(qmodel, x)
    # QLinearConv requantizes with its own integer rounding: a few output steps at most
    step = float(quant_modules(qmodel)["fc"].input_quantizer.scale)  # type: ignore[union-attr]
    assert np.abs(out - ref).max() <= 8 * step * float(
        qmodel.fc.module.weight.detach().abs().sum(1).max()
    )
    # the int8 form TensorRT needs runs those convs in float in ORT
    trt = export_onnx(qmodel, x[:1], tmp_path / "trt.onnx", target="tensorrt")
    assert _optimized_ops(trt, tmp_path).count("QLinearConv") < 4


@pytest.mark.parametrize("target", ["tensorrt", "openvino"])
def test_tensorrt_and_openvino_targets_keep_int8_zero_point_0(residual_int8, tmp_path, target):
    qmodel, x = residual_int8
    model = onnx.load(export_onnx(qmodel, x[:1], tmp_path / "m.onnx", target=target))
    inits = {t.name: t for t in model.graph.initializer}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == 9  # with the residual add's output (presets.int8())
    for q in quantizers:
        assert inits[q.input[2]].data_type == TensorProto.INT8
        assert not numpy_helper.to_array(inits[q.input[2]]).any()
    clips = [n for n in model.graph.node if n.op_type in ("Clip", "Relu")]
    assert len(clips) == 3  # left where they were, in float


def test_tensorrt_refuses_affine_activations_and_bad_targets(residual_int8, tmp_path):
    qmodel, x = residual_int8
    asym = quantize(ResidualNet(), presets.int8_asymmetric(), [x], progress=False)
    with pytest.raises(ValueError, match=r"target=.tensorrt. needs symmetric int8.*stem.input"):
        export_onnx(asym, x[:1], tmp_path / "a.onnx", target="tensorrt")
    with pytest.raises(ValueError, match="target must be one of 'onnxruntime', 'openvino'"):
        export_onnx(qmodel, x[:1], tmp_path / "b.onnx", target="ort")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("op", "bounds", "scale", "zero_point", "moved"),
    [
        ("Clip", (0.0, 6.0), 6 / 127, 128, True),  # ReLU6 before int8() mapped to uint8
        ("Clip", (-1.0, 0.5), 0.01, 100, True),
        ("Relu", (), 0.05, 128, True),
        ("Relu", (), 0.05, 0, True),  # clips no code: dropped
        ("Clip", (0.0, 0.125), 0.25, 128, False),  # 0.125 / 0.25 is a rounding tie: kept
    ],
)
def test_clip_moves_after_quantize_exactly(op, bounds, scale, zero_point, moved):
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    from lowbit.export._targets import clip_codes_after_quantize

    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
        numpy_helper.from_array(np.array(zero_point, np.uint8), "z"),
    ]
    inits += [
        numpy_helper.from_array(np.array(b, np.float32), f"b{i}") for i, b in enumerate(bounds)
    ]
    nodes = [
        helper.make_node(op, ["x", *[f"b{i}" for i in range(len(bounds))]], ["c"], name="clip"),
        helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    rewritten = copy.deepcopy(model)
    assert clip_codes_after_quantize(rewritten.graph) == int(moved)
    onnx.checker.check_model(rewritten, full_check=True)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-20, 20, 4000), np.arange(-800, 800) * scale / 4])
    x = x.astype(np.float32)
    expected = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(ReferenceEvaluator(rewritten).run(None, {"x": x})[0], expected)
    np.testing.assert_array_equal(_run_plain(rewritten, x), expected)


def _run_plain(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, {"x": x})[0]


def test_int8_presets_quantize_the_outputs_runtimes_need():
    assert presets.int8().fusable_outputs and presets.int8_asymmetric().fusable_outputs
    assert not presets.int8(fusable_outputs=False).fusable_outputs


def test_onnxruntime_export_names_the_convs_it_will_run_in_float(residual_int8, tmp_path):
    import warnings

    from lowbit import LowbitWarning

    qmodel, x = residual_int8
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowbitWarning)
        export_onnx(qmodel, x[:1], tmp_path / "fused.onnx")  # output quantizers: no warning
    config = presets.int8(fusable_outputs=False)
    plain = quantize(ResidualNet(), config, [x], progress=False)
    with pytest.warns(
        LowbitWarning, match=r"3 quantized convolution\(s\) in float \(stem, project, head\)"
    ):
        export_onnx(plain, x[:1], tmp_path / "plain.onnx")
