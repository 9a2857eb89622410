"""Write a quantized Hugging Face checkpoint in compressed-tensors' `pack-quantized` format.

compressed-tensors is the format llm-compressor writes and transformers and vLLM load. A
quantized Linear `<m>` is stored as four tensors (compressed-tensors 0.20):

    <m>.weight_packed      int32 (out, ceil(in * bits / 32)): the codes plus 2^(bits-1), as
                           unsigned `bits`-bit fields packed densely along each row, element i
                           in bits [i*bits, (i+1)*bits) of the row's little-endian bit stream
                           (each run of 32 elements fills exactly `bits` words)
    <m>.weight_scale       float32 (out, groups); kept in float32 so the loaded weight is exactly
                           lowbit's dequantized weight
    <m>.weight_zero_point  int32 (ceil(out * bits / 32), groups), asymmetric weights only: the
                           signed zero points packed the same way along the output dimension
    <m>.weight_shape       int64 [out, in]

and `config.json` carries a `quantization_config` naming the scheme of every group of layers.

The streaming quantizer writes one safetensors shard per decoder block (`write_block`), each whole
or not at all, so a run that stops can resume from the blocks on disk (`done_blocks`). Tensors
outside the blocks (embeddings, final norm, lm_head) go to negative block indices: by convention
-1, in one call. `finish` writes the shard index and the config, copies the tokenizer, and removes
the marker file that says the folder is partial.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from lowbit._atomic import write_atomic
from lowbit.io.partial_folder import PARTIAL_MARKER, copy_loader_files, open_partial
from lowbit.io.quantized_weight import QuantizedWeight

__all__ = [
    "CompressedTensorsWriter",
    "pack_int32",
    "quantization_config",
    "unpack_int32",
]

_SHARD = re.compile(r"model-block-(m?)(\d{5})\.safetensors")
_SCHEMES = "lowbit.quantized"  # shard metadata key: {module: [bits, group_size, symmetric]}


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed `bits`-bit codes (int8, 2-D) into int32 words along `dim`, as
    compressed-tensors' pack-quantized stores them (see the module docstring)."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError(f"codes must be a 2-D int8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel() and (int(codes.min()) < low or int(codes.max()) > high):
        raise ValueError(f"codes fall outside the signed {bits}-bit range [{low}, {high}]")
    values = codes.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        values = values.t()
    rows, cols = values.shape
    padded = -(-cols // 32) * 32
    groups = torch.nn.functional.pad(values, (0, padded - cols)).reshape(-1, 32)
    start = torch.arange(32, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    words = torch.zeros(groups.shape[0], bits + 1, dtype=torch.int64)
    # the fields do not overlap, so adding them is OR-ing them
    words.index_add_(1, word, (groups << offset) & 0xFFFFFFFF)
    words.index_add_(1, word + 1, groups >> (32 - offset))
    words = words[:, :bits].reshape(rows, -1)[:, : -(-cols * bits // 32)]
    packed = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return (packed.t() if dim == 0 else packed).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """The int8 codes `pack_int32` packed; `size`: their count along the packed `dim`."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise TypeError(f"packed must be a 2-D int32 tensor, got {packed.dtype}")
    words = packed.t() if dim == 0 else packed
    words = words.to(torch.int64) & 0xFFFFFFFF
    rows, count = words.shape
    if count != -(-size * bits // 32):
        raise ValueError(f"{count} words per row cannot hold {size} {bits}-bit codes")
    if 32 % bits == 0:  # 1, 2, 4, 8 bits: whole fields in each word
        shifts = torch.arange(0, 32, bits, dtype=torch.int64)
        fields = (words[..., None] >> shifts) & ((1 << bits) - 1)
    else:
        groups = -(-size // 32)
        words = torch.nn.functional.pad(words, (0, groups * bits - count)).reshape(-1, bits)
        start = torch.arange(32, dtype=torch.int64) * bits
        word, offset = start // 32, start % 32
        # each field: its low part from `word`, the bits past 32 (if any) from the next word
        spill = torch.nn.functional.pad(words, (0, 1))[:, word + 1] << (32 - offset)
        fields = ((words[:, word] >> offset) | spill) & ((1 << bits) - 1)
    codes = (fields.reshape(rows, -1)[:, :size] - (1 << (bits - 1))).to(torch.int8)
    return (codes.t() if dim == 0 else codes).contiguous()


def _weight_tensors(name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one quantized `<module>.weight`."""
    if not name.endswith(".weight"):
        raise ValueError(f"a QuantizedWeight must be stored under a '.weight' name, got {name!r}")
    stem = name[: -len("weight")]
    out: dict[str, torch.Tensor] = {
        stem + "weight_packed": pack_int32(weight.codes.cpu(), weight.bits),
        stem + "weight_scale": weight.scale.detach().cpu().to(torch.float32).contiguous(),
        stem + "weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
    }
    if weight.zero_point is not None:
        zero = weight.zero_point.detach().cpu()
        if not torch.equal(zero, zero.round()):
            raise ValueError(f"{name}: compressed-tensors stores integer zero points only")
        out[stem + "weight_zero_point"] = pack_int32(zero.to(torch.int8), weight.bits, dim=0)
    return out


def _scheme(weight: QuantizedWeight) -> list[Any]:
    return [weight.bits, weight.group_size, weight.zero_point is None]


def _shard_name(index: int) -> str:
    return f"model-block-{'m' if index < 0 else ''}{abs(index):05d}.safetensors"


class CompressedTensorsWriter:
    """Writes a compressed-tensors checkpoint into `dst_dir` one block at a time (see the module
    docstring). `dst_dir` must be absent, empty, or a partial output of an earlier run (which
    then resumes); `run` (JSON data, e.g. the quantization settings) is stored in the partial
    marker, and a partial folder written with other settings is refused rather than mixed."""

    def __init__(self, dst_dir: str | os.PathLike[str], *, run: Mapping[str, Any] | None = None):
        self.dst = Path(dst_dir)
        self.run = open_partial(
            self.dst, run or {}, {"format": "compressed-tensors", "writer": "lowbit"}
        )

    def done_blocks(self) -> set[int]:
        """Block indices whose shard is on disk (each shard is written whole or not at all)."""
        done = set()
        for path in self.dst.glob("model-block-*.safetensors"):
            match = _SHARD.fullmatch(path.name)
            if match:
                done.add(-int(match[2]) if match[1] else int(match[2]))
        return done

    def write_block(
        self, index: int, tensors: Mapping[str, torch.Tensor | QuantizedWeight]
    ) -> None:
        """Write block `index`'s tensors (HF names; QuantizedWeight or float tensors) as one
        shard, atomically; negative indices hold the tensors outside the decoder blocks."""
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not (self.dst / PARTIAL_MARKER).is_file():
            raise RuntimeError(f"{self.dst} is finished; start a new writer for a new output")
        out: dict[str, torch.Tensor] = {}
        schemes: dict[str, list[Any]] = {}
        for name, value in tensors.items():
            if isinstance(value, QuantizedWeight):
                out.update(_weight_tensors(name, value))
                schemes[name[: -len(".weight")]] = _scheme(value)
            elif isinstance(value, torch.Tensor):
                out[name] = value.detach().cpu().contiguous().clone()
            else:
                raise TypeError(f"{name}: expected a Tensor or QuantizedWeight, got {type(value)}")
        metadata = {"format": "pt", "lowbit.block": str(index), _SCHEMES: json.dumps(schemes)}
        write_atomic(self.dst / _shard_name(index), safetensors_bytes(out, metadata))

    def finish(self, src_dir: str | os.PathLike[str], quantization: Mapping[str, Any]) -> None:
        """Complete the checkpoint: shard index, config.json with its `quantization_config`, the
        tokenizer and generation files of `src_dir`; then drop the partial marker.

        `quantization`: JSON data recorded in the index metadata under "lowbit" (method, bits,
        calibration, ...); its optional key "input_activations" (compressed-tensors
        QuantizationArgs as a dict, e.g. dynamic per-token int8 for W8A8) is applied to every
        quantized layer."""
        src = Path(src_dir)
        if not (self.dst / PARTIAL_MARKER).is_file():
            raise RuntimeError(f"{self.dst} is already finished")
        config = json.loads((src / "config.json").read_text())
        self._check_blocks(config)
        weight_map, total, schemes = self._read_shards()
        linears = _linear_modules(src)
        extra = dict(quantization)
        config["quantization_config"] = quantization_config(
            schemes, linears, extra.get("input_activations")
        )
        copy_loader_files(src, self.dst)
        index = {"metadata": {"total_size": total, "lowbit": extra}, "weight_map": weight_map}
        write_atomic(
            self.dst / "model.safetensors.index.json", json.dumps(index, indent=2).encode()
        )
        write_atomic(self.dst / "config.json", json.dumps(config, indent=2).encode())
        (self.dst / PARTIAL_MARKER).unlink()

    def _check_blocks(self, config: Mapping[str, Any]) -> None:
        layers = config.get("num_hidden_layers")
        missing = sorted(set(range(int(layers))) - self.done_blocks()) if layers else []
        if missing:
            raise ValueError(f"{self.dst}: blocks {missing} were never written; rerun to resume")

    def _read_shards(self) -> tuple[dict[str, str], int, dict[str, list[Any]]]:
        """weight_map, total bytes and quantized schemes of every shard, read from headers."""
        weight_map: dict[str, str] = {}
        schemes: dict[str, list[Any]] = {}
        total = 0
        for index in sorted(self.done_blocks()):
            name = _shard_name(index)
            with safe_open(self.dst / name, framework="pt") as f:
                schemes.update(json.loads((f.metadata() or {}).get(_SCHEMES, "{}")))
                for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    if key in weight_map:
                        raise ValueError(f"{key} is in both {weight_map[key]} and {name}")
                    weight_map[key] = name
                    part = f.get_slice(key)
                    total += _nbytes(part.get_shape(), part.get_dtype())
        return dict(sorted(weight_map.items())), total, schemes


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}


def _nbytes(shape: list[int], dtype: str) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * _DTYPE_BYTES.get(dtype, 1)


def _linear_modules(src: Path) -> set[str]:
    """Names of the nn.Linear modules of the model `src`'s config describes (built on the meta
    device: no memory), so layers left in float can be named in the ignore list."""
    import transformers  # lazy: only writers of HF checkpoints need it

    config = transformers.AutoConfig.from_pretrained(src)
    architectures = getattr(config, "architectures", None) or []
    if not architectures or not hasattr(transformers, architectures[0]):
        raise ValueError(f"{src}/config.json names no transformers architecture: {architectures}")
    with torch.device("meta"):
        model = getattr(transformers, architectures[0])(config)
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def quantization_config(
    schemes: Mapping[str, list[Any]],
    linears: set[str],
    input_activations: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """compressed-tensors' `quantization_config` for quantized modules `schemes` ({module:
    [bits, group_size, symmetric]}) in a model whose Linear modules are `linears`. One scheme
    targets "Linear" and ignores the float ones; several list their modules by name."""
    if not schemes:
        raise ValueError("no quantized weight was written: nothing for compressed-tensors")
    by_scheme: dict[tuple[Any, ...], list[str]] = {}
    for module, scheme in sorted(schemes.items()):
        by_scheme.setdefault(tuple(scheme), []).append(module)
    groups = {}
    for i, ((bits, group_size, symmetric), modules) in enumerate(
        sorted(by_scheme.items(), key=str)
    ):
        weights = {
            "num_bits": bits,
            "type": "int",
            "symmetric": symmetric,
            "group_size": group_size,
            "strategy": "channel" if group_size is None else "group",
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
        }
        targets = ["Linear"] if len(by_scheme) == 1 else modules
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": weights,
            "input_activations": dict(input_activations) if input_activations else None,
            "output_activations": None,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(linears - set(schemes)),
        "kv_cache_scheme": None,
    }
