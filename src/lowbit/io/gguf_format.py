"""Convert a quantized (or float) Hugging Face Llama checkpoint to GGUF, the file llama.cpp runs.

GGUF's simplest blocks hold 32 weights and one float16 scale: Q8_0 stores the codes q as int8 and
means q * d; Q4_0 stores q + 8 in a nibble and means (nibble - 8) * d. lowbit's symmetric 4- and
8-bit codes in groups of 32 with float16-representable scales are exactly these, so the GGUF means
the very weights lowbit's simulation used; anything else (another group size, zero points, other
bit widths, float32-only scales) does not map exactly and is refused with what GGUF needs.

The source is a finished compressed-tensors folder (`CompressedTensorsWriter`) or a plain float
one. GGUF puts every tensor's description before the data, so the conversion first plans from the
safetensors headers and the (small) scales, then reads, converts and writes one tensor at a time:
memory stays at one tensor. The file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from lowbit._atomic import atomic_path
from lowbit.io.compressed_tensors import unpack_int32

__all__ = ["GGUF_ARCHITECTURES", "write_gguf"]

GGUF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_BLOCK = 32  # weights per Q4_0 / Q8_0 block


@dataclass(frozen=True)
class _Tensor:
    gguf_name: str
    key: str  # HF tensor name (for a quantized weight: the module name + ".weight")
    kind: str  # "q4_0", "q8_0", "f32" or "f16"
    shape: tuple[int, ...]  # the float tensor's shape
    heads: int  # > 0: rows are permuted from HF's rotate-half order to GGUF's interleaved


class _Checkpoint:
    """The tensors of a safetensors checkpoint folder, each read only when asked for."""

    def __init__(self, folder: Path, stack: ExitStack):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(f"{folder} has no model.safetensors(.index.json)")
        self.files = {
            name: stack.enter_context(safe_open(folder / name, framework="pt"))
            for name in sorted(set(weight_map.values()))
        }
        self.weight_map: dict[str, str] = weight_map

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        return self.files[self.weight_map[key]].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.files[self.weight_map[key]].get_slice(key).get_shape())


def _schemes(config: Mapping[str, Any], modules: list[str]) -> dict[str, dict[str, Any]]:
    """The weight QuantizationArgs of each quantized module, from `quantization_config`."""
    qc = config.get("quantization_config") or {}
    if modules and qc.get("format") != "pack-quantized":
        raise ValueError(
            f"GGUF conversion reads pack-quantized checkpoints, got {qc.get('format')}"
        )
    found: dict[str, dict[str, Any]] = {}
    for module in modules:
        for group in qc.get("config_groups", {}).values():
            for target in group.get("targets", []):
                hit = target == "Linear" or target == module
                if target.startswith("re:"):
                    hit = re.match(target[3:], module) is not None
                if hit and module not in found:
                    found[module] = group["weights"]
        if module not in found:
            raise ValueError(f"{module} is packed but no config group targets it")
    return found


def _gguf_kind(module: str, args: Mapping[str, Any], scale: torch.Tensor) -> str:
    """Q4_0 / Q8_0 when the module's codes map onto them exactly; else a ValueError that says
    what GGUF needs."""
    bits, group, symmetric = args.get("num_bits"), args.get("group_size"), args.get("symmetric")
    exact_scales = torch.equal(scale.to(torch.float16).to(scale.dtype), scale)
    if bits in (4, 8) and group == _BLOCK and symmetric and exact_scales:
        return "q4_0" if bits == 4 else "q8_0"
    raise ValueError(
        f"{module}: GGUF Q4_0 / Q8_0 hold symmetric 4- or 8-bit codes in groups of {_BLOCK} "
        f"with float16 scales; this layer has bits={bits}, group_size={group}, "
        f"symmetric={symmetric}, float16 scales={exact_scales}. Quantize with bits=4 or 8, "
        f"group_size={_BLOCK}, symmetric weights and scales rounded to float16"
    )


def _plan(ckpt: _Checkpoint, config: Mapping[str, Any], float_type: str) -> list[_Tensor]:
    import gguf  # lazy: only the GGUF writer needs the package

    layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    modules = [k[: -len(".weight_packed")] for k in ckpt.weight_map if k.endswith(".weight_packed")]
    schemes = _schemes(config, modules)
    plan = []
    for key in sorted(ckpt.weight_map, key=_natural):
        if key.endswith((".weight_scale", ".weight_shape", ".weight_zero_point")):
            continue
        if key.endswith(".rotary_emb.inv_freq"):
            continue
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight_packed"):
            key = module + ".weight"
            shape = tuple(int(s) for s in ckpt.get(module + ".weight_shape").tolist())
            if module + ".weight_zero_point" in ckpt:
                schemes[module] = {**schemes[module], "symmetric": False}
            kind = _gguf_kind(module, schemes[module], ckpt.get(module + ".weight_scale"))
        else:
            shape = ckpt.shape(key)
            kind = float_type if len(shape) == 2 else "f32"
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{key} has no place in a GGUF llama model")
        permute = heads if ".q_proj." in key else kv_heads if ".k_proj." in key else 0
        plan.append(_Tensor(gguf_name, key, kind, shape, permute))
    return plan


def _natural(key: str) -> tuple[Any, ...]:
    """Sort key: layer 2 before layer 10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))


def _rope_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """HF stores each q / k head's rows in rotate-half order; llama.cpp wants them interleaved.
    A permutation of whole rows: the codes and their scales move together, values unchanged."""
    if heads == 0:
        return t
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _blocks(codes: torch.Tensor, scale: torch.Tensor, kind: str) -> np.ndarray:
    """Q4_0 / Q8_0 bytes, (out, blocks * block_bytes): per block the float16 scale, then the 32
    codes (Q4_0: q + 8, element j in the low nibble of byte j, element j + 16 in its high one)."""
    out, cols = codes.shape
    c = codes.numpy().reshape(out, cols // _BLOCK, _BLOCK)
    d = scale.to(torch.float16).numpy().reshape(out, cols // _BLOCK, 1).view(np.uint8)
    if kind == "q8_0":
        qs = c.view(np.uint8)
    else:
        u = (c.astype(np.int16) + 8).astype(np.uint8)
        qs = (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(out, -1)


def _data(ckpt: _Checkpoint, t: _Tensor) -> np.ndarray:
    """One tensor's GGUF bytes (quantized) or values (float), read now."""
    if t.kind in ("q4_0", "q8_0"):
        module = t.key[: -len(".weight")]
        bits = 4 if t.kind == "q4_0" else 8
        codes = unpack_int32(ckpt.get(module + ".weight_packed"), bits, t.shape[1])
        scale = ckpt.get(module + ".weight_scale")
        return _blocks(_rope_rows(codes, t.heads), _rope_rows(scale, t.heads), t.kind)
    value = _rope_rows(ckpt.get(t.key).to(torch.float32), t.heads)
    return value.numpy() if t.kind == "f32" else value.to(torch.float16).numpy()


def _tensor_bytes(t: _Tensor) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """(shape handed to the writer, numpy dtype, byte count) of a planned tensor."""
    count = int(np.prod(t.shape))
    if t.kind in ("q4_0", "q8_0"):
        width = (18 if t.kind == "q4_0" else 34) * t.shape[1] // _BLOCK
        return (t.shape[0], width), np.dtype(np.uint8), t.shape[0] * width
    dtype = np.dtype(np.float32 if t.kind == "f32" else np.float16)
    return t.shape, dtype, count * dtype.itemsize


def write_gguf(
    src_dir: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    float_type: str = "f32",
    tokenizer_pre: str = "default",
) -> None:
    """Write the Llama-family checkpoint in `src_dir` (compressed-tensors pack-quantized, or
    float) as the GGUF file `path`, for llama.cpp.

    Quantized layers become Q4_0 / Q8_0 blocks holding lowbit's codes and scales exactly (or a
    ValueError says why they cannot); float 2-D tensors become `float_type` ("f32" or "f16"),
    norms F32. The tokenizer (tokenizer.json's byte-level BPE: tokens, merges, token types,
    special ids, chat template) comes from `src_dir`; `tokenizer_pre` names llama.cpp's
    pre-tokenizer (e.g. "llama-bpe", "smollm"; "default" when unknown)."""
    import gguf

    src = Path(src_dir)
    if float_type not in ("f32", "f16"):
        raise ValueError(f"float_type must be 'f32' or 'f16', got {float_type!r}")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json")
    config = json.loads((src / "config.json").read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF export supports {GGUF_ARCHITECTURES}, not {architecture}")
    with ExitStack() as stack:
        ckpt = _Checkpoint(src, stack)
        plan = _plan(ckpt, config, float_type)
        tmp = stack.enter_context(atomic_path(path))
        writer = gguf.GGUFWriter(tmp, "llama")
        stack.callback(writer.close)
        _add_metadata(writer, config, plan)
        _add_tokenizer(writer, src, int(config["vocab_size"]), tokenizer_pre)
        for t in plan:
            shape, dtype, nbytes = _tensor_bytes(t)
            raw = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}
            writer.add_tensor_info(t.gguf_name, shape, dtype, nbytes, raw_dtype=raw.get(t.kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(_data(ckpt, t))
        writer.close()


def _add_metadata(writer: Any, config: Mapping[str, Any], plan: list[_Tensor]) -> None:
    """llama.cpp's llama hyperparameters, from the HF config."""
    import gguf

    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default" or scaling:
        raise ValueError(f"GGUF export supports plain RoPE only, got {rope or scaling}")
    heads = int(config["num_attention_heads"])
    writer.add_name(str(config.get("_name_or_path") or "lowbit model"))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
    writer.add_rope_dimension_count(int(head_dim))
    kinds = {t.kind for t in plan if len(t.shape) == 2}
    file_type = {
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
    }
    most = next((k for k in ("q4_0", "q8_0", "f16") if k in kinds), None)
    writer.add_file_type(file_type[most] if most else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokens(src: Path, vocab_size: int) -> Iterator[tuple[str, int]]:
    """(token, GGUF token type) for every id below `vocab_size`, from tokenizer.json."""
    import gguf

    path = src / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src} has no tokenizer.json (GGUF needs the tokenizer)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers, got {model.get('type')}")
    by_id = {int(i): (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in tok.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(by_id)} beyond vocab_size {vocab_size}")
    for i in range(vocab_size):
        yield by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))


def _add_tokenizer(writer: Any, src: Path, vocab_size: int, pre: str) -> None:
    import gguf

    tokens = list(_tokens(src, vocab_size))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([t for t, _ in tokens])
    writer.add_token_types([int(k) for _, k in tokens])
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
