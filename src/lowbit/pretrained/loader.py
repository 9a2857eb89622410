"""`load_pretrained`: the model a `quantize_pretrained(..., format="lowbit")` folder holds, in one
call: the transformers model built from the folder's config.json, each block's Linear layers the
integer layers of its block file (`lowbit.load`), the tensors outside the blocks from the outer
files. The model is built on the meta device and made real one part at a time, so the float
model never exists in memory: the peak is the quantized model plus one float block.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lowbit.io.lowbit_format import load
from lowbit.io.partial_folder import PARTIAL_MARKER
from lowbit.pretrained.architectures import (
    Family,
    block_made_real,
    blocks_path,
    build_meta,
    make_real,
    name_map,
    tied_parameters,
)
from lowbit.pretrained.lowbit_writer import MANIFEST, block_file

__all__ = ["load_pretrained"]


def load_pretrained(dst_dir: str | os.PathLike[str]) -> nn.Module:
    """The quantized model in `dst_dir`, the output of `quantize_pretrained(..., format="lowbit")`:
    the transformers model (e.g. `LlamaForCausalLM`) in eval mode whose blocks hold lowbit's
    integer layers; its outputs are those of the quantization run's simulation.

    Raises ValueError with what to do for a folder that is partial (a stopped run: rerun
    `quantize_pretrained` with the same arguments), lacks a block or outer file, or holds
    another format (compressed-tensors and GGUF folders load with transformers / llama.cpp).
    """
    folder = Path(dst_dir)
    record = _manifest(folder)
    config_dict = json.loads((folder / "config.json").read_text("utf-8"))
    config, family, arch, model = build_meta(folder, config_dict)
    if arch != record.get("architecture"):
        raise ValueError(
            f"{folder}: config.json names {arch} but {MANIFEST} records "
            f"{record.get('architecture')}: the folder mixes two outputs"
        )
    path = blocks_path(model, family)
    blocks = model.get_submodule(path)
    assert isinstance(blocks, nn.ModuleList)
    if path != record.get("blocks_path") or len(blocks) != record.get("num_blocks"):
        raise ValueError(
            f"{folder}: {MANIFEST} records {record.get('num_blocks')} blocks at "
            f"{record.get('blocks_path')!r}, config.json builds {len(blocks)} at {path!r}"
        )
    missing = [i for i in range(len(blocks)) if not block_file(folder, i).is_file()]
    if missing:
        raise ValueError(f"{folder} lacks the block file(s) of block(s) {missing}: incomplete")
    _load_outer(model, folder, family, config, path)
    for i in range(len(blocks)):
        load(block_file(folder, i), block_made_real(blocks, i))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{folder} does not hold the tensor(s) {left[:5]}: incomplete")
    return model.eval()


def _manifest(folder: Path) -> dict[str, object]:
    """The run record of a finished lowbit-format folder; ValueError naming what it is else."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if (folder / PARTIAL_MARKER).is_file():
        done = len(list((folder / "blocks").glob("block-*.lowbit")))
        raise ValueError(
            f"{folder} is a partial output ({done} block(s) written; {PARTIAL_MARKER} is still "
            "there): rerun quantize_pretrained with the same arguments to finish it"
        )
    if not (folder / MANIFEST).is_file():
        if (folder / "model.gguf").is_file():
            kind = "a GGUF output (model.gguf): llama.cpp loads it"
        elif (folder / "config.json").is_file() and "quantization_config" in json.loads(
            (folder / "config.json").read_text("utf-8")
        ):
            kind = (
                "a compressed-tensors output: transformers.AutoModelForCausalLM.from_pretrained "
                "loads it"
            )
        else:
            kind = "not an output of quantize_pretrained"
        raise ValueError(
            f"{folder} has no {MANIFEST}: it is {kind}; load_pretrained reads the folders "
            'quantize_pretrained(..., format="lowbit") writes'
        )
    record: dict[str, object] = json.loads((folder / MANIFEST).read_text("utf-8"))
    return record


def _load_outer(model: nn.Module, folder: Path, family: Family, config: object, path: str) -> None:
    """Make everything outside the blocks real and load it from the outer files; parameters
    tied on the meta model (making a module real gives it new ones) are tied again."""
    stored: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("outer-*.safetensors")):
        stored.update(load_file(str(file)))
    inside = f"{path}."
    names = name_map(model, stored, folder, skip=inside)  # ValueError if a tensor is missing
    ties = tied_parameters(model)
    base = path.removesuffix(family.blocks).removesuffix(".")
    for rel in family.front:
        make_real(model, f"{base}.{rel}" if base else rel, config)
    for name, module in model.named_modules():
        meta = any(t.is_meta for t in [*module.parameters(False), *module.buffers(False)])
        if meta and not f"{name}.".startswith(inside):
            module.to_empty(device="cpu", recurse=False)
    model.load_state_dict({k: stored[v] for k, v in names.items()}, strict=False)
    for name, same in ties.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(same))
