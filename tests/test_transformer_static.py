"""`presets.int8_transformer()`: static W8A8 with both attention matmuls quantized, whichever
attention a Hugging Face model runs (sdpa or eager), and its ONNX export run by ONNX Runtime.

A tiny BERT built from a config (random weights, no download), quantized on random tokens.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from test_export_transformers import _assert_matches_simulation, _run, _simulate, _tokens
from torch import nn

from lowbit import presets
from lowbit.export import export_onnx
from lowbit.nn.modules import quant_modules
from lowbit.nn.op_points import attention_ops, op_points
from lowbit.workflows.quantization import quantize

transformers = pytest.importorskip("transformers")

ATTENTION_POINTS = {"matmul_0", "softmax_0", "matmul_1"}


def _float_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=5,
        attn_implementation="sdpa",
    )
    return transformers.BertForTokenClassification(config).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """The same float BERT run with sdpa and with eager attention, each quantized."""
    sdpa = _float_bert()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    calib = [_tokens(4, 16, seed) for seed in range(4)]
    config = presets.int8_transformer()
    return {
        "float": sdpa,
        "sdpa": quantize(sdpa, config, calib, progress=False),
        "eager": quantize(eager, config, calib, progress=False),
    }


def test_both_attention_matmuls_quantized_with_sdpa_and_eager(models):
    for name in ("sdpa", "eager"):
        qmodel = models[name]
        points = op_points(qmodel)
        callers = [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]
        assert sorted(points) == callers, name
        for caller in callers:
            assert set(points[caller].quantizers()) == ATTENTION_POINTS
            # both operands of both matmuls are quantized: Q, K, V leave their Linear quantized
            for proj in ("query", "key", "value"):
                assert quant_modules(qmodel)[f"{caller}.{proj}"].output_quantizer is not None
        # every Linear is quantized, the adds are kept in float (none is a point)
        layers = quant_modules(qmodel)
        linears = [n for n, m in models["float"].named_modules() if isinstance(m, nn.Linear)]
        assert set(linears) <= set(layers)
        kinds = {r.kind for r in qmodel.lowbit_summary.ops if r.quantized}
        assert kinds == {"matmul", "softmax"}
    tokens = _tokens(3, 12, seed=5)
    # sdpa run as its three ops gives exactly what eager attention gives
    assert np.array_equal(_simulate(models["sdpa"], tokens), _simulate(models["eager"], tokens))
    # and the points change the numbers (they are not off)
    assert not np.allclose(_simulate(models["sdpa"], tokens), _simulate(models["float"], tokens))


def test_attention_ops_is_sdpa_without_quantizers():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    keep = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    keep[..., 0] = True
    same = lambda kind, x: x  # noqa: E731
    cases = [
        {},
        {"attn_mask": keep},
        {"attn_mask": torch.where(keep, 0.0, -1e4)},
        {"is_causal": True},
        {"scale": 0.3},
    ]
    for kwargs in cases:
        ref = F.scaled_dot_product_attention(q, k, v, **kwargs)
        torch.testing.assert_close(attention_ops(same, q, k, v, **kwargs), ref)
    kv = (torch.randn(2, 1, 5, 8, generator=g) for _ in range(2))
    k1, v1 = kv
    ref = F.scaled_dot_product_attention(q, k1, v1, enable_gqa=True)
    torch.testing.assert_close(attention_ops(same, q, k1, v1, enable_gqa=True), ref)
    seen: list[str] = []
    attention_ops(lambda kind, x: seen.append(kind) or x, q, k, v)
    assert seen == ["matmul", "softmax", "matmul"]


def test_export_runs_in_onnx_runtime(models, tmp_path):
    qmodel = models["sdpa"]
    path = export_onnx(qmodel, _tokens(2, 8, seed=10), tmp_path / "bert.onnx")
    graph = onnx.load(path).graph
    assert not any("Attention" in n.op_type for n in graph.node)
    # one Q/DQ pair per activation quantizer: the attention points' too
    activations = [
        q
        for m in quant_modules(qmodel).values()
        for role, q in m.quantizers().items()
        if role != "weight" and q.mode != "off"
    ] + [q for p in op_points(qmodel).values() for q in p.quantizers().values()]
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == len(activations)
    for batch, length in [(1, 5), (3, 24)]:
        tokens = _tokens(batch, length, seed=batch)
        _assert_matches_simulation(_run(path, tokens), _simulate(qmodel, tokens), qmodel)
    # with its optimizations on, ONNX Runtime runs the attention matmuls in integer
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    integer = {"QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
    assert "MatMul" not in ops, ops
    assert sum(op in integer for op in ops) >= 2 * 2 + 6 * 2, ops
