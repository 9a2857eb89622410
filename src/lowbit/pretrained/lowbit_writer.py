"""format="lowbit": lowbit's own files, one per block; `lowbit.load(block_file(dst, i), layer)`
puts block i's integer layers into the float model's layer i (docs/pretrained.md).

    dst/config.json, tokenizer files        copied from the source folder
    dst/outer-00001.safetensors, ...        the float tensors outside the blocks (checkpoint names)
    dst/blocks/block-00003.lowbit           block 3, converted (`lowbit.convert`) and saved with
                                            `lowbit.save`: integer codes, scales, float norms;
                                            module names relative to the block
    dst/lowbit_pretrained.json              architecture, block path, recipe
    dst/lowbit-partial.json                 only while the folder is being written

Every file is written whole or not at all; a rerun resumes from the blocks on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lowbit._atomic import write_atomic
from lowbit.io.lowbit_format import save
from lowbit.io.partial_folder import PARTIAL_MARKER, copy_loader_files, open_partial
from lowbit.io.quantized_weight import QuantizedWeight
from lowbit.workflows.conversion import convert

__all__ = ["MANIFEST", "LowbitWriter", "block_file"]

MANIFEST = "lowbit_pretrained.json"
_BLOCK = re.compile(r"block-(\d{5})\.lowbit")
_OUTER = re.compile(r"outer-(\d{5})\.safetensors")


def block_file(dst: Path, index: int) -> Path:
    return dst / "blocks" / f"block-{index:05d}.lowbit"


class LowbitWriter:
    """Writes the folder described in the module docstring, block by block."""

    def __init__(self, dst_dir: str | os.PathLike[str], *, run: Mapping[str, Any]) -> None:
        self.dst = Path(dst_dir)
        self.run = open_partial(self.dst, run, {"format": "lowbit"})
        (self.dst / "blocks").mkdir(exist_ok=True)

    def done_blocks(self) -> set[int]:
        done = {
            int(m[1]) for p in (self.dst / "blocks").glob("*") if (m := _BLOCK.fullmatch(p.name))
        }
        return done | {-int(m[1]) for p in self.dst.glob("*") if (m := _OUTER.fullmatch(p.name))}

    def write_block(
        self,
        index: int,
        tensors: Mapping[str, torch.Tensor | QuantizedWeight],
        block: nn.Module | None = None,
    ) -> None:
        """Negative indices: float tensors outside the blocks; else the quantized `block`."""
        if index < 0:
            plain = {k: v.contiguous() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
            if len(plain) != len(tensors):
                raise TypeError("the tensors outside the blocks must be float tensors")
            name = f"outer-{-index:05d}.safetensors"
            write_atomic(self.dst / name, safetensors_bytes(plain, {"format": "pt"}))
            return
        if block is None:
            raise ValueError("format 'lowbit' writes the quantized block module: pass block=")
        save(convert(block), block_file(self.dst, index))

    def finish(self, src_dir: str | os.PathLike[str], quantization: Mapping[str, Any]) -> None:
        """Copy the config and tokenizer, write the manifest, drop the partial marker."""
        src = Path(src_dir)
        shutil.copyfile(src / "config.json", self.dst / "config.json")
        copy_loader_files(src, self.dst)
        write_atomic(self.dst / MANIFEST, json.dumps(dict(quantization), indent=2).encode())
        (self.dst / PARTIAL_MARKER).unlink()
