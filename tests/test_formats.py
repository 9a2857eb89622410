"""Output formats of issue 17, each checked against its real consumer: compressed-tensors
(`pack-quantized`) loaded by transformers and decompressed by compressed-tensors itself; GGUF read
back and dequantized by the `gguf` package. The model is a tiny random LlamaForCausalLM with a
small byte-level BPE tokenizer, built here (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.io.compressed_tensors import CompressedTensorsWriter, pack_int32, unpack_int32
from lowbit.io.partial_folder import PARTIAL_MARKER
from lowbit.io.quantized_weight import QuantizedWeight

transformers = pytest.importorskip("transformers")

LAYERS = 2


def rtn(
    w: torch.Tensor, bits: int, group: int | None, *, symmetric: bool = True
) -> QuantizedWeight:
    """Round to nearest, float16-representable scales (so GGUF can hold them exactly)."""
    out, cols = w.shape
    g = w.reshape(out, -1, group or cols)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if symmetric:
        scale = (g.abs().amax(-1) / high).half().float()
        zero = None
        codes = torch.round(g / scale[..., None]).clamp(low, high)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / ((1 << bits) - 1)).half().float()
        zero = (torch.round(-lo / scale) + low).clamp(low, high)
        codes = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(low, high)
    return QuantizedWeight(codes.reshape(out, cols).to(torch.int8), scale, zero, bits, group)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_source(tmp_path_factory.mktemp("src"))


def build_source(folder: Path) -> Path:
    """A float Llama folder: config, safetensors, tokenizer.json (byte-level BPE)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    )
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def write(source: Path, dst: Path, quantize) -> dict[str, torch.Tensor]:
    """Quantize every Linear of every block with `quantize(name, weight)`; returns the float
    state dict of the simulation (dequantized weights)."""
    from safetensors.torch import load_file

    state = load_file(source / "model.safetensors")
    writer = CompressedTensorsWriter(dst, run={"test": 1})
    simulated = dict(state)
    for block in range(LAYERS):
        tensors: dict[str, torch.Tensor | QuantizedWeight] = {}
        for name, value in state.items():
            if name.startswith(f"model.layers.{block}."):
                if value.dim() == 2:
                    record = quantize(name, value)
                    tensors[name] = record
                    simulated[name] = record.dequantize()
                else:
                    tensors[name] = value
        writer.write_block(block, tensors)
    rest = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    writer.write_block(-1, rest)
    writer.finish(source, {"method": "rtn"})
    return simulated


def test_pack_matches_the_defined_layout() -> None:
    """4 bits: element i in bits 4i..4i+3 of its word; 3 bits straddle words (dense)."""
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(2).reshape(1, 32)
    words = pack_int32(codes, 4)
    assert words.shape == (1, 4)
    expected = sum(i << (4 * i) for i in range(8))  # codes -8..-1 + 8 = 0..7
    assert int(words[0, 0]) & 0xFFFFFFFF == expected
    three = torch.zeros(1, 32, dtype=torch.int8)
    three[0, 10] = 3  # stored 3 + 4 = 7 at bits 30..32: two bits in word 0, one in word 1
    packed = pack_int32(three, 3).to(torch.int64) & 0xFFFFFFFF
    offset = 4 * sum(1 << (3 * i) for i in range(32)) & ((1 << 96) - 1)
    stream = sum(int(w) << (32 * k) for k, w in enumerate(packed[0])) ^ offset
    assert stream == 3 << 30
    for bits in range(1, 9):
        for dim in (0, 1):
            c = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, 45), dtype=torch.int8)
            packed = pack_int32(c, bits, dim)
            assert torch.equal(unpack_int32(packed, bits, c.shape[dim], dim), c)
    with pytest.raises(ValueError, match="outside the signed 4-bit range"):
        pack_int32(torch.tensor([[8]], dtype=torch.int8), 4)


def test_pack_agrees_with_compressed_tensors() -> None:
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for bits in range(2, 9):
        c = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, 70), dtype=torch.int8)
        assert torch.equal(helpers.pack_to_int32(c, bits), pack_int32(c, bits))
        assert torch.equal(helpers.pack_to_int32(c, bits, packed_dim=0), pack_int32(c, bits, 0))


def test_transformers_loads_the_checkpoint(source: Path, tmp_path: Path) -> None:
    """W4 g32 for the MLP, W8 per channel for attention (two config groups), lm_head tied:
    transformers' loaded weights are lowbit's dequantized weights, and so are its logits."""
    pytest.importorskip("compressed_tensors")

    def quantize(name: str, w: torch.Tensor) -> QuantizedWeight:
        return rtn(w, 4, 32) if ".mlp." in name else rtn(w, 8, None)

    dst = tmp_path / "ct"
    simulated = write(source, dst, quantize)
    assert not (dst / PARTIAL_MARKER).exists()
    assert (dst / "tokenizer.json").is_file()
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(qc)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    reference = transformers.LlamaForCausalLM.from_pretrained(source).eval()
    reference.load_state_dict(simulated, strict=False)  # lm_head is tied to the embeddings
    ids = torch.randint(
        0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        got, want = loaded(ids).logits, reference(ids).logits
    state = loaded.state_dict()
    for name, value in simulated.items():
        if ".layers." in name and value.dim() == 2:
            assert torch.equal(state[name], value), name
    # same weights, same float32 program: only summation order may differ
    bound = 64 * torch.finfo(torch.float32).eps * float(want.abs().max())
    assert float((got - want).abs().max()) <= bound


def test_compressed_tensors_decompresses_asymmetric_weights(tmp_path: Path) -> None:
    """Zero points are packed along the output dimension; compressed-tensors' own decompressor
    must give back lowbit's dequantized matrix exactly (transformers 5.24 itself cannot load
    asymmetric pack-quantized checkpoints yet: it expects unpacked zero points)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    from lowbit.io.compressed_tensors import quantization_config

    torch.manual_seed(2)
    writer = CompressedTensorsWriter(tmp_path)
    for bits, group in ((4, 32), (8, None), (3, 16)):
        record = rtn(torch.randn(48, 64), bits, group, symmetric=False)
        writer.write_block(bits, {"m.weight": record})
        shard = load_file(next(tmp_path.glob(f"model-block-*{bits}.safetensors")))
        tensors = {k.split(".", 1)[1]: v for k, v in shard.items()}
        assert tensors["weight_zero_point"].shape == (-(-48 * bits // 32), record.scale.shape[1])
        qc = quantization_config({"m": [bits, group, False]}, {"m"})
        scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
        weight = PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]
        assert torch.equal(weight, record.dequantize())


def test_partial_output_resumes_and_refuses(source: Path, tmp_path: Path) -> None:
    dst = tmp_path / "partial"
    writer = CompressedTensorsWriter(dst, run={"bits": 4})
    record = rtn(torch.randn(8, 32), 4, 32)
    writer.write_block(0, {"model.layers.0.mlp.up_proj.weight": record})
    assert (dst / PARTIAL_MARKER).is_file()
    assert CompressedTensorsWriter(dst, run={"bits": 4}).done_blocks() == {0}
    with pytest.raises(ValueError, match="another run"):
        CompressedTensorsWriter(dst, run={"bits": 8})
    with pytest.raises(ValueError, match=r"blocks \[1\] were never written"):
        writer.finish(source, {})
    assert (dst / PARTIAL_MARKER).is_file() and not (dst / "config.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("mine")
    with pytest.raises(FileExistsError, match="not a partial lowbit output"):
        CompressedTensorsWriter(other)
    with pytest.raises(ValueError, match=r"'\.weight' name"):
        writer.write_block(1, {"model.layers.1.mlp.up_proj": record})
