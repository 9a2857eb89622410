"""`quantize_pretrained(..., format="gguf")` with GPTQ and AWQ (issue 17): Q4_0 holds the codes
lowbit's simulation used exactly (gguf's own reference dequantization), because every scale,
GPTQ's found while it runs included, is rounded to float16 before its codes are chosen: the
streamed GPTQ codes are those of in-memory GPTQ with `scale_dtype=torch.float16`, not GPTQ's
float32-scale result rounded again afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf.quants import dequantize  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_formats import LAYERS, build_source  # noqa: E402
from test_formats_gguf import interleaved  # noqa: E402
from test_pretrained import _in_memory_codes  # noqa: E402

import lowbit  # noqa: E402
from lowbit.io.quantized_weight import QuantizedWeight  # noqa: E402
from lowbit.pretrained import engine  # noqa: E402

_HF = {  # GGUF name: (module, rotary rows permuted)
    "attn_q": ("self_attn.q_proj", True),
    "attn_k": ("self_attn.k_proj", True),
    "attn_v": ("self_attn.v_proj", False),
    "attn_output": ("self_attn.o_proj", False),
    "ffn_gate": ("mlp.gate_proj", False),
    "ffn_up": ("mlp.up_proj", False),
    "ffn_down": ("mlp.down_proj", False),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_source(tmp_path_factory.mktemp("src"))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gguf_holds_gptq_and_awq_codes_exactly(
    source: Path, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    records: dict[str, QuantizedWeight] = {}
    written = engine.quantized_tensors

    def capture(*args: Any) -> dict[str, Any]:  # what the simulation used, block by block
        tensors = written(*args)
        records.update({k: v for k, v in tensors.items() if isinstance(v, QuantizedWeight)})
        return tensors

    monkeypatch.setattr(engine, "quantized_tensors", capture)
    torch.set_num_threads(1)
    calib = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    dst = tmp_path / "out"
    lowbit.quantize_pretrained(
        source, dst, method=method, bits=4, group_size=32, calib=calib, format="gguf",
        progress=False,
    )  # fmt: skip
    reader = gguf.GGUFReader(dst / engine.GGUF_FILE)
    tensors = {t.name: t for t in reader.tensors}
    config = transformers.AutoConfig.from_pretrained(source)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    original = load_file(source / "model.safetensors")
    differs_from_rtn = 0
    assert len(records) == 7 * LAYERS
    if method == "gptq":
        reference = _in_memory_codes(source, calib, method, scale_dtype=torch.float16)
        assert sorted(reference) == sorted(k.removesuffix(".weight") for k in records)
        for name, codes in reference.items():
            assert torch.equal(records[name + ".weight"].codes.int(), codes.int()), name
    for block in range(LAYERS):
        for name, (module, rotary) in _HF.items():
            t = tensors[f"blk.{block}.{name}.weight"]
            assert t.tensor_type.name == "Q4_0"
            record = records[f"model.layers.{block}.{module}.weight"]
            want = record.dequantize()
            want = interleaved(want, heads[name]) if rotary else want
            got = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
            assert torch.equal(got, want), (block, name)
            w = original[f"model.layers.{block}.{module}.weight"]
            groups = w.reshape(w.shape[0], -1, 32) / record.scale.unsqueeze(-1)
            rtn = torch.round(groups).clamp(-8, 7).reshape(w.shape)
            differs_from_rtn += int((rtn != record.codes).sum())
    if method == "gptq":  # error compensation moved codes off round to nearest
        assert differs_from_rtn > 0


def test_scales_round_to_float16_values_that_are_never_zero_or_infinite() -> None:
    from lowbit.numerics import representable_scale

    scale = torch.tensor([1e-9, 1.0001, 0.1, 1e6])
    got = representable_scale(scale, torch.float16)
    assert got.dtype == torch.float32
    assert torch.equal(got.half().float(), got)  # float16 holds each exactly
    assert got[0] == 2.0**-24 and got[3] == 65504.0  # clamped into float16's range
    assert got[1] == torch.tensor(1.0001).half().float() and got[2] == torch.tensor(0.1).half()
