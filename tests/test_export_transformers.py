"""Exporting a quantized Hugging Face model: keyword inputs, the opset its operators need, batch
and sequence axes that ONNX Runtime accepts at any size, eval mode while exporting.

A tiny BERT built from a config (random weights, no download), quantized on random tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lowbit import presets
from lowbit.export import export_onnx
from lowbit.nn.modules import quant_modules
from lowbit.nn.op_points import op_points
from lowbit.workflows.quantization import quantize

transformers = pytest.importorskip("transformers")

VOCAB = 100
TOKEN_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def _tokens(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens; the first sequence padded on its last quarter, as a tokenizer would."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - length // 4 :] = 0
    return {
        "input_ids": torch.randint(0, VOCAB, (batch, length), generator=g),
        "attention_mask": mask,
        "token_type_ids": torch.randint(0, 2, (batch, length), generator=g),
    }


def _bert(attention: str) -> nn.Module:
    """BertForTokenClassification: logits (batch, sequence, labels) from a quantized classifier."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=5,
        attn_implementation=attention,
    )
    model = transformers.BertForTokenClassification(config).eval()
    calib = [_tokens(4, 16, seed) for seed in range(4)]
    return quantize(model, presets.int8_asymmetric(), calib, progress=False)


@pytest.fixture(scope="module")
def qbert() -> nn.Module:
    return _bert("sdpa")


def _run(path: Any, tokens: dict[str, torch.Tensor]) -> np.ndarray:
    options = ort.SessionOptions()
    # plain Q/DQ kernels: the simulation's arithmetic, in float32 (no fused integer kernels)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in tokens.items()})[0]


def _simulate(model: nn.Module, tokens: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(**tokens).logits.numpy()


def _assert_matches_simulation(out: np.ndarray, ref: np.ndarray, model: nn.Module) -> None:
    """The file computes what the simulation computes, to float rounding and one step.

    ORT (optimizations off) and the simulation run the same Q/DQ arithmetic in float32, so they
    differ by float rounding, except where a value lies within rounding of a code boundary of an
    activation quantizer: there either side is right and the code may differ by one step. The
    logits are the classifier's W @ codes * step + b, so if every input code of the classifier
    moved by one step, no logit could move by more than step * max_row ||W||_1: the bound for
    every element. Typical elements (the median) must agree to float rounding (float32 eps
    1.2e-7 over the ~100 ops of the network: 1e-5 of the logits' scale): a wrong classifier
    input (an error of up to half a step on every code) puts the median at ~1e-3. Upstream
    quantizers are absorbed by the classifier's, so the structure test counts them.
    """
    classifier = quant_modules(model)["classifier"]
    assert classifier.input_quantizer is not None
    step = float(classifier.input_quantizer.scale)
    one_step = step * float(classifier.quantized_weight().detach().abs().sum(1).max())
    diff = np.abs(out - ref)
    assert diff.max() <= one_step, (diff.max(), one_step)
    assert np.median(diff) <= 1e-5 * np.abs(ref).max(), np.median(diff)


def test_dict_inputs_dynamic_batch_and_sequence(qbert, tmp_path):
    path = export_onnx(qbert, _tokens(2, 8, seed=10), tmp_path / "bert.onnx")
    model = onnx.load(path)
    # scaled_dot_product_attention needs opset 14 in the TorchScript exporter: the lowest
    assert model.opset_import[0].version == 14
    assert [i.name for i in model.graph.input] == TOKEN_INPUTS
    assert [o.name for o in model.graph.output] == ["logits"]
    # float parameters keep the model's own names (not those of the wrapper export traces)
    assert "bert.embeddings.LayerNorm.weight" in {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "sequence"]
    # one QuantizeLinear per activation quantizer, those of the residual adds' outputs too (the
    # median check below only sees the last)
    activations = [
        q
        for m in quant_modules(qbert).values()
        for role, q in m.quantizers().items()
        if role != "weight" and q is not None and q.mode != "off"
    ] + [q for points in op_points(qbert).values() for q in points.quantizers().values()]
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == len(activations) > 12
    for batch, length in [(1, 5), (3, 24)]:  # neither the example's batch nor its length
        tokens = _tokens(batch, length, seed=batch)
        out = _run(path, tokens)
        assert out.shape == (batch, length, 5)
        _assert_matches_simulation(out, _simulate(qbert, tokens), qbert)


def test_lowest_opset_without_sdpa(tmp_path):
    eager = _bert("eager")  # attention from matmul and softmax: opset 13 suffices
    tokens = _tokens(2, 8, seed=11)
    model = onnx.load(export_onnx(eager, tokens, tmp_path / "eager.onnx"))
    assert model.opset_import[0].version == 13


def test_positional_and_args_kwargs_inputs(qbert, tmp_path):
    tokens = _tokens(2, 8, seed=12)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    ref = _simulate(qbert, {"input_ids": ids, "attention_mask": mask})
    forms: dict[str, Any] = {
        "tuple": ((ids, mask), ["input_0", "input_1"]),
        "args_kwargs": (((ids,), {"attention_mask": mask}), ["input", "attention_mask"]),
    }
    for name, (example, names) in forms.items():
        path = export_onnx(qbert, example, tmp_path / f"{name}.onnx")
        assert [i.name for i in onnx.load(path).graph.input] == names
        out = _run(path, dict(zip(names, [ids, mask], strict=True)))
        _assert_matches_simulation(out, ref, qbert)


def test_named_dynamic_axes(qbert, tmp_path):
    tokens = _tokens(2, 8, seed=13)
    axes = {"input_ids": [0], "attention_mask": {0: "n"}, "token_type_ids": {0: "n"}}
    model = onnx.load(export_onnx(qbert, tokens, tmp_path / "b.onnx", dynamic_axes=axes))
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    assert dims == {
        "input_ids": ["input_ids_dim_0", 8],
        "attention_mask": ["n", 8],
        "token_type_ids": ["n", 8],
    }


def test_train_mode_wrapper_exports_eval_and_keeps_every_mode(qbert, tmp_path):
    """Dropout is on in train mode: the file must hold the eval-mode model, and export must
    leave every submodule's flag as it found it (a mixed wrapper: head training, encoder not)."""
    qbert.train()
    qbert.bert.encoder.eval()
    before = {name: m.training for name, m in qbert.named_modules()}
    try:
        tokens = _tokens(3, 12, seed=14)
        path = export_onnx(qbert, tokens, tmp_path / "train.onnx")
        assert {name: m.training for name, m in qbert.named_modules()} == before
        qbert.eval()
        _assert_matches_simulation(_run(path, tokens), _simulate(qbert, tokens), qbert)
    finally:
        qbert.eval()


def test_mode_restored_when_export_fails(qbert, tmp_path):
    qbert.train()
    try:
        with pytest.raises(ValueError, match="opset"):
            export_onnx(qbert, _tokens(2, 8, seed=15), tmp_path / "bad.onnx", opset=13)
        assert all(m.training for m in qbert.modules())
    finally:
        qbert.eval()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"opset": 13}, ValueError, r"opset=13.*scaled_dot_product_attention.*opset 14"),
        ({"dynamic_axes": {"ids": [0]}}, ValueError, r"'ids'.*neither an input"),
        ({"dynamic_axes": {"input_ids": [2]}}, ValueError, r"dim 2 is not a dimension of a 2-D"),
        ({"dynamic_axes": {"logits": {0: 7}}}, ValueError, r"label must be a string"),
        ({"dynamic_axes": ["input_ids"]}, TypeError, r"dynamic_axes must be a dict"),
        ({"input_names": ["a"]}, ValueError, r"input_names must be 3 strings"),
    ],
)
def test_bad_arguments_name_what_is_wrong(qbert, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        export_onnx(qbert, _tokens(2, 8, seed=16), tmp_path / "bad.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_bad_example_inputs(qbert, tmp_path):
    with pytest.raises(TypeError, match=r"example_inputs\['attention_mask'\] must be a tensor"):
        export_onnx(
            qbert,
            {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": 1},
            tmp_path / "b.onnx",
        )
    with pytest.raises(TypeError, match="example_inputs must be"):
        export_onnx(qbert, {}, tmp_path / "b.onnx")
