"""GGUF output (issue 17): the file the `gguf` package reads back holds lowbit's weights exactly
(Q4_0 / Q8_0 dequantized by gguf's own reference code), in llama.cpp's layout and with the
tokenizer; codes that GGUF cannot hold exactly are refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.io.quantized_weight import QuantizedWeight

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from gguf.quants import dequantize  # noqa: E402
from test_formats import LAYERS, build_source, rtn, write  # noqa: E402

from lowbit.io.gguf_format import write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_source(tmp_path_factory.mktemp("src"))


def interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of a q / k projection: within each head, HF's rows j and
    j + half (the two halves that rotate_half pairs) become rows 2j and 2j + 1."""
    dim = w.shape[0] // heads
    order = [
        h * dim + p * (dim // 2) + j for h in range(heads) for j in range(dim // 2) for p in (0, 1)
    ]
    return w[order]


def field(reader: object, key: str) -> object:
    f = reader.fields[key]  # type: ignore[attr-defined]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value[0]


def test_gguf_holds_the_weights_exactly(source: Path, tmp_path: Path) -> None:
    def quantize(name: str, w: torch.Tensor) -> QuantizedWeight:
        return rtn(w, 4, 32) if ".mlp." in name or ".q_proj" in name else rtn(w, 8, 32)

    simulated = write(source, tmp_path / "ct", quantize)
    path = tmp_path / "model.gguf"
    write_gguf(tmp_path / "ct", path, tokenizer_pre="llama-bpe")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    config = json.loads((source / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hf = {
        "attn_q": ("self_attn.q_proj", heads, "Q4_0"),
        "attn_k": ("self_attn.k_proj", kv, "Q8_0"),
        "attn_v": ("self_attn.v_proj", 0, "Q8_0"),
        "attn_output": ("self_attn.o_proj", 0, "Q8_0"),
        "ffn_gate": ("mlp.gate_proj", 0, "Q4_0"),
        "ffn_up": ("mlp.up_proj", 0, "Q4_0"),
        "ffn_down": ("mlp.down_proj", 0, "Q4_0"),
    }
    for block in range(LAYERS):
        for name, (module, rope_heads, kind) in hf.items():
            t = tensors[f"blk.{block}.{name}.weight"]
            assert t.tensor_type.name == kind
            want = simulated[f"model.layers.{block}.{module}.weight"]
            want = interleaved(want, rope_heads) if rope_heads else want
            got = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
            assert torch.equal(got, want), name
        norm = tensors[f"blk.{block}.attn_norm.weight"]
        assert norm.tensor_type.name == "F32"
        want = simulated[f"model.layers.{block}.input_layernorm.weight"]
        assert torch.equal(torch.from_numpy(norm.data.copy()), want)
    embed = torch.from_numpy(tensors["token_embd.weight"].data.copy())
    assert torch.equal(embed, simulated["model.embed_tokens.weight"])
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == LAYERS
    assert field(reader, "llama.attention.head_count_kv") == kv
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    assert field(reader, "tokenizer.ggml.bos_token_id") == 0
    assert field(reader, "tokenizer.ggml.eos_token_id") == 1
    vocab = json.loads((source / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == config["vocab_size"]
    token_id = vocab["Ġthe"]
    assert bytes(tokens.parts[tokens.data[token_id]]).decode() == "Ġthe"
    types = reader.fields["tokenizer.ggml.token_type"]
    assert types.parts[types.data[0]][0] == gguf.TokenType.CONTROL  # <s>
    assert types.parts[types.data[token_id]][0] == gguf.TokenType.NORMAL
    assert len(reader.fields["tokenizer.ggml.merges"].data) > 0


@pytest.mark.parametrize(
    ("quantize", "message"),
    [
        (lambda n, w: rtn(w, 4, 16), "group_size=16"),
        (lambda n, w: rtn(w, 4, 32, symmetric=False), "symmetric=False"),
        (lambda n, w: rtn(w, 3, 32), "bits=3"),
        (
            lambda n, w: QuantizedWeight(
                rtn(w, 8, 32).codes, rtn(w, 8, 32).scale * (1 + 2**-20), None, 8, 32
            ),
            "float16 scales=False",
        ),
    ],
)
def test_gguf_refuses_codes_it_cannot_hold(source: Path, tmp_path: Path, quantize, message) -> None:
    write(source, tmp_path / "ct", quantize)
    path = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match=message):
        write_gguf(tmp_path / "ct", path)
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".model.gguf*")) == []


def test_gguf_refuses_other_architectures(source: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="BertModel"):
        write_gguf(folder, tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        write_gguf(tmp_path / "nothing", tmp_path / "x.gguf")


def test_gguf_failure_mid_write_leaves_nothing(source: Path, tmp_path: Path) -> None:
    """The tokenizer is read after the output file is opened: its absence must leave no file."""
    write(source, tmp_path / "ct", lambda n, w: rtn(w, 8, 32))
    (tmp_path / "ct" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        write_gguf(tmp_path / "ct", tmp_path / "model.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]
