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
from safetensors.torch import save_file
from torch import nn

from lowbit._atomic import write_atomic
from lowbit.io.lowbit_format import save
from lowbit.io.quantized_weight import QuantizedWeight
from lowbit.workflows.conversion import convert

__all__ = ["MANIFEST", "PARTIAL", "LowbitWriter", "block_file"]

PARTIAL = "lowbit-partial.json"
MANIFEST = "lowbit_pretrained.json"
_BLOCK = re.compile(r"block-(\d{5})\.lowbit")
_OUTER = re.compile(r"outer-(\d{5})\.safetensors")
# the files of a model folder a loader needs beside the weights
_COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def block_file(dst: Path, index: int) -> Path:
    return dst / "blocks" / f"block-{index:05d}.lowbit"


class LowbitWriter:
    """Writes the folder described in the module docstring, block by block."""

    def __init__(self, dst_dir: str | os.PathLike[str], *, run: Mapping[str, Any]) -> None:
        self.dst = Path(dst_dir)
        self.run = json.loads(json.dumps(dict(run)))
        marker = self.dst / PARTIAL
        if marker.is_file():
            earlier = json.loads(marker.read_text("utf-8")).get("run")
            if earlier != self.run:
                raise ValueError(
                    f"{self.dst} holds a partial output of another run ({earlier}); remove it "
                    "or rerun with those settings"
                )
            return
        if self.dst.exists() and (not self.dst.is_dir() or any(self.dst.iterdir())):
            raise FileExistsError(
                f"dst_dir {self.dst} exists and is not an empty folder nor a partial lowbit "
                "output: choose a new folder"
            )
        (self.dst / "blocks").mkdir(parents=True, exist_ok=True)
        write_atomic(marker, json.dumps({"format": "lowbit", "run": self.run}).encode())

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
            tmp = self.dst / f".{name}.tmp"
            save_file(plain, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, self.dst / name)
            return
        if block is None:
            raise ValueError("format 'lowbit' writes the quantized block module: pass block=")
        save(convert(block), block_file(self.dst, index))

    def finish(self, src_dir: str | os.PathLike[str], quantization: Mapping[str, Any]) -> None:
        """Copy the config and tokenizer, write the manifest, drop the partial marker."""
        src = Path(src_dir)
        for name in _COPIED:
            if (src / name).is_file():
                shutil.copyfile(src / name, self.dst / name)
        write_atomic(self.dst / MANIFEST, json.dumps(dict(quantization), indent=2).encode())
        (self.dst / PARTIAL).unlink()
