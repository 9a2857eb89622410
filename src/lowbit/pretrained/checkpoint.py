"""A Hugging Face model folder read lazily: its config and safetensors shards, tensor by tensor.

Nothing is read until asked for: opening a folder parses `config.json`, the shard index and each
shard's header (a few KB), and checks that every shard is there and whole (a shard shorter than
its header says is reported as truncated), so bad input fails before any output is written.
`read(names)` then copies just those tensors out of the memory-mapped shards and closes them, so
the resident memory holds the tensors asked for and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

__all__ = ["Checkpoint", "TensorInfo"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from its shard's header."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


class Checkpoint:
    """The config and tensor table of a Hugging Face folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"src_dir: no such folder: {self.folder}")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise ValueError(
                f"src_dir {self.folder} has no config.json: pass a Hugging Face model folder "
                "(config.json, tokenizer files, *.safetensors)"
            )
        try:
            self.config_dict: dict[str, Any] = json.loads(config_path.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from None
        self.tensors: dict[str, TensorInfo] = {}
        for shard, names in self._shards().items():
            header = _read_header(shard)
            for name in names if names is not None else header:
                if name not in header:
                    raise ValueError(
                        f"shard {shard.name} lacks tensor {name!r} that {_INDEX} places there: "
                        "the checkpoint is incomplete or its index is stale"
                    )
                self.tensors[name] = header[name]

    def _shards(self) -> dict[Path, list[str] | None]:
        """Shard path -> the tensor names the index puts there (None: all of a single file)."""
        index = self.folder / _INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{index} is not a safetensors index: {error}") from None
            shards: dict[Path, list[str] | None] = {}
            for name, file in weight_map.items():
                names = shards.setdefault(self.folder / file, [])
                assert names is not None
                names.append(name)
            missing = sorted(p.name for p in shards if not p.is_file())
            if missing:
                raise ValueError(
                    f"checkpoint {self.folder} is missing shard(s) {', '.join(missing)} "
                    f"named in {_INDEX}"
                )
            return shards
        single = self.folder / _SINGLE
        if single.is_file():
            return {single: None}
        raise ValueError(
            f"src_dir {self.folder} has no {_SINGLE} nor {_INDEX}: lowbit reads safetensors "
            "checkpoints (save the model with save_pretrained(..., safe_serialization=True))"
        )

    def fingerprint(self) -> str:
        """A short hash of the config and the tensor table (names, dtypes, shapes, sizes): a
        resumed run checks that it reads the same checkpoint."""
        h = hashlib.sha256(json.dumps(self.config_dict, sort_keys=True).encode())
        for name in sorted(self.tensors):
            info = self.tensors[name]
            h.update(f"{name}:{info.dtype}:{info.shape}:{info.file.stat().st_size}".encode())
        return h.hexdigest()[:16]

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The named tensors (as `dtype` if given), shard by shard; each shard is closed before
        the next is opened."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.tensors:
                raise ValueError(f"checkpoint {self.folder} has no tensor {name!r}")
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out: dict[str, Tensor] = {}
        for file, wanted in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in wanted:
                    t = f.get_tensor(name)
                    out[name] = t if dtype is None else t.to(dtype)
        return out


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensor table of one safetensors file; ValueError if it is not one or is truncated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(
                f"shard {path.name} is truncated ({size} bytes): not a safetensors file"
            )
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError(
                f"shard {path.name} is truncated: its header claims {length} bytes, the file "
                f"has {size}"
            )
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"shard {path.name} is not a safetensors file: {error}") from None
    header.pop("__metadata__", None)
    table: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise ValueError(
                f"shard {path.name}: tensor {name!r} has an unsupported or malformed entry "
                f"{entry!r}"
            ) from None
        table[name] = TensorInfo(path, dtype, shape)
    if 8 + length + end > size:
        raise ValueError(
            f"shard {path.name} is truncated: its tensors need {8 + length + end} bytes, the "
            f"file has {size} (an interrupted download or copy?)"
        )
    return table
