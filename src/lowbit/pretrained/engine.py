"""`quantize_pretrained`: a Hugging Face checkpoint quantized block by block, in bounded memory.

As the GPTQ paper and llm-compressor's sequential onloading do: the calibration tokens run through
the embeddings once; then each block is loaded from the checkpoint, quantized on its cached inputs,
written, and freed, and its quantized outputs become the next block's inputs. Resident memory is
one block (float32), the calibration activations of one block boundary (once: each batch's output
replaces its input), the algorithm's working set (GPTQ: the widest layer's Hessian and one more
matrix of its size) and a fixed overhead.

Resume: the writer keeps a marker file in the output folder until `finish`; every block is written
atomically; the inputs of the next block are saved (atomically) after each block. A rerun with the
same settings skips the blocks on disk and continues from the saved inputs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lowbit.pretrained.architectures import BlockInput, Skeleton
from lowbit.pretrained.block import METHODS, Recipe, quantize_block, quantized_tensors
from lowbit.pretrained.calibration import calibration_batches, fingerprint
from lowbit.pretrained.checkpoint import Checkpoint
from lowbit.pretrained.lowbit_writer import LowbitWriter
from lowbit.progress import progress_bar

__all__ = ["FORMATS", "quantize_pretrained"]

FORMATS = ("compressed-tensors", "gguf", "lowbit")
GGUF_FILE = "model.gguf"  # format="gguf": beside the compressed-tensors files it is made from
_ACTS = ".lowbit-activations"  # the saved inputs of the next block, while partial


def quantize_pretrained(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    method: str = "rtn",
    bits: int = 4,
    group_size: int | None = 128,
    calib: Any = None,
    format: str = "compressed-tensors",
    seq_len: int = 2048,
    num_samples: int | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    awq_grid: int = 20,
    smoothquant_alpha: float = 0.5,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize the Hugging Face model in `src_dir` block by block into `dst_dir`.

    method: "rtn" (round to nearest; no calibration), "gptq", "awq" (weight-only, `bits` with
    `group_size` inputs per scale, None for per channel), or "smoothquant" (W8A8: int8 weights
    per channel, activations int8 per token at run time). calib: texts or token ids (see
    `calibration_batches`), cut into `seq_len`-token windows, at most `num_samples`.
    damp, act_order: GPTQ's damping; its columns by decreasing Hessian diagonal (static groups).
    format: "compressed-tensors" (the default; transformers and vLLM load it), "gguf" (the same
    folder plus `model.gguf` for llama.cpp: Q4_0 / Q8_0 blocks, so bits 4 or 8 with group_size=32,
    every scale rounded to float16 before its codes are chosen, GPTQ's as it finds them) or
    "lowbit" (one lowbit file per block, see `lowbit_writer`).

    Returns the run's record (also stored in the output). Bad input (no config.json, a missing
    or truncated shard, an unsupported architecture, too little calibration text) raises
    ValueError before anything is written; a stopped run leaves a partial folder that a rerun
    with the same arguments resumes.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    recipe = _recipe(method, bits, group_size, damp, awq_grid, smoothquant_alpha, format)
    recipe = _with_act_order(recipe, act_order)
    ckpt = Checkpoint(src_dir)
    if format == "gguf" and not (ckpt.folder / "tokenizer.json").is_file():
        raise ValueError(f"format 'gguf' needs the tokenizer: {ckpt.folder} has no tokenizer.json")
    skeleton = Skeleton(ckpt)
    _check_group_size(skeleton, recipe)
    batches: list[Tensor] = []
    if recipe.needs_calibration:
        if calib is None:
            raise ValueError(f"method {method!r} needs calibration data: pass calib=")
        max_len = getattr(skeleton.config, "max_position_embeddings", seq_len)
        batches = calibration_batches(
            calib,
            ckpt.folder,
            seq_len=min(seq_len, max_len),
            num_samples=num_samples,
            vocab_size=skeleton.config.vocab_size,
        )
    run = {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "source": ckpt.fingerprint(),
        "calibration": fingerprint(batches) if batches else None,
        "settings": [damp, awq_grid, smoothquant_alpha] + (["act_order"] if act_order else []),
    }
    writer = _writer(format, Path(dst_dir), run)
    started = time.perf_counter()
    done = writer.done_blocks()
    for k, name in enumerate(skeleton.outer_names()):  # one tensor at a time: an embedding
        if -(k + 1) not in done:  # matrix can be the largest tensor of the model
            _write(writer, -(k + 1), ckpt.read([name]), None)
    _run_blocks(skeleton, recipe, batches, writer, done, progress)
    record = _record(skeleton, recipe, run, time.perf_counter() - started, len(batches))
    if format == "gguf":
        from lowbit.io.gguf_format import write_gguf

        writer.finish(ckpt.folder, record)
        write_gguf(dst_dir, Path(dst_dir) / GGUF_FILE)
    else:
        writer.finish(ckpt.folder, record)
    shutil.rmtree(Path(dst_dir) / _ACTS, ignore_errors=True)
    return record


def _recipe(
    method: str,
    bits: int,
    group_size: int | None,
    damp: float,
    grid: int,
    alpha: float,
    format: str,
) -> Recipe:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if bits not in (2, 3, 4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits!r}")
    if group_size is not None and (
        not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1
    ):
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if method == "smoothquant" and (bits != 8 or group_size is not None):
        raise ValueError(
            "smoothquant is W8A8: int8 weights per channel; pass bits=8, group_size=None"
        )
    if format == "gguf" and (method == "smoothquant" or group_size != 32 or bits not in (4, 8)):
        raise ValueError(
            "format 'gguf' writes Q4_0 / Q8_0 blocks: bits 4 or 8 with group_size=32, weight-only "
            f"(rtn, gptq or awq; got method {method!r}, bits {bits}, group_size {group_size}); "
            "use format 'compressed-tensors' for the others"
        )
    return Recipe(method, bits, group_size, damp, grid, alpha, fp16_scales=format == "gguf")


def _with_act_order(recipe: Recipe, act_order: bool) -> Recipe:
    if not isinstance(act_order, bool):
        raise ValueError(f"act_order must be True or False, got {act_order!r}")
    return dataclasses.replace(recipe, act_order=act_order)


def _check_group_size(skeleton: Skeleton, recipe: Recipe) -> None:
    if recipe.group_size is None:
        return
    widths = {m.in_features for m in skeleton.blocks[0].modules() if isinstance(m, torch.nn.Linear)}
    bad = sorted(w for w in widths if w % recipe.group_size)
    if bad:
        raise ValueError(
            f"group_size {recipe.group_size} does not divide the input width(s) {bad} of "
            f"this model's layers: pass a divisor of {sorted(widths)} or None (per channel)"
        )


def _writer(format: str, dst: Path, run: dict[str, Any]) -> Any:
    if format == "lowbit":
        return LowbitWriter(dst, run=run)
    from lowbit.io.compressed_tensors import CompressedTensorsWriter

    return CompressedTensorsWriter(dst, run=run)


def _write(writer: Any, index: int, tensors: Any, block: torch.nn.Module | None) -> None:
    if isinstance(writer, LowbitWriter):
        writer.write_block(index, tensors, block)
    else:
        writer.write_block(index, tensors)


def _run_blocks(
    skeleton: Skeleton,
    recipe: Recipe,
    batches: Sequence[Tensor],
    writer: Any,
    done: set[int],
    progress: bool,
) -> None:
    """Quantize and write every block not on disk yet, in order."""
    n = skeleton.num_blocks
    acts = Path(writer.dst) / _ACTS
    start = min((i for i in range(n) if i not in done), default=n)
    inputs: list[BlockInput] = []
    if recipe.needs_calibration and start < n:
        skeleton.load_front()
        inputs = skeleton.block_inputs(batches)
        start = _resume_point(acts, start, inputs)
    todo = range(start, n)
    label = f"{recipe.method} {recipe.bits}-bit, block"
    for i in progress_bar(todo, f"{label}s {start}..{n - 1}", enabled=progress and start < n):
        block = skeleton.load_block(i)
        quantize_block(block, recipe, inputs, skeleton.scale_groups)
        dtypes = {
            name: skeleton.ckpt.tensors[name].dtype for name in skeleton.block_names(i).values()
        }
        tensors = quantized_tensors(block, skeleton.block_names(i), dtypes)
        if recipe.needs_calibration and i + 1 < n:
            with torch.no_grad():  # batch by batch, each output replacing its input: the
                for b in inputs:  # activations are held once, not at both boundaries
                    b.hidden = b.run(block)
        _write(writer, i, tensors, block)
        if recipe.needs_calibration and i + 1 < n:
            _save_inputs(acts, i + 1, inputs)
        del tensors, block
        skeleton.drop_block(i)


def _resume_point(acts: Path, start: int, inputs: list[BlockInput]) -> int:
    """The block to restart from: `start` when its saved inputs exist (they replace the
    embeddings' hidden states in `inputs`), else the last block before it whose inputs were
    saved (it is quantized again, identically), else block 0."""
    for i in range(start, 0, -1):
        path = acts / f"inputs-{i:05d}.safetensors"
        if path.is_file():
            saved = load_file(str(path))
            for k, b in enumerate(inputs):
                b.hidden = saved[str(k)]
            return i
    return 0


def _save_inputs(acts: Path, index: int, inputs: Sequence[BlockInput]) -> None:
    acts.mkdir(exist_ok=True)
    path = acts / f"inputs-{index:05d}.safetensors"
    tmp = acts / f".inputs-{index:05d}.tmp"
    save_file({str(k): b.hidden.contiguous() for k, b in enumerate(inputs)}, str(tmp))
    os.replace(tmp, path)
    for old in acts.glob("inputs-*.safetensors"):
        if old != path:
            old.unlink()


def _record(
    skeleton: Skeleton, recipe: Recipe, run: dict[str, Any], seconds: float, samples: int
) -> dict[str, Any]:
    """What the output folder records about how it was made."""
    act = recipe.activation_spec
    return {
        "architecture": skeleton.architecture,
        "blocks_path": skeleton.blocks_path,
        "num_blocks": skeleton.num_blocks,
        "method": recipe.method,
        "bits": recipe.bits,
        "group_size": recipe.group_size,
        "symmetric": True,
        "calibration_batches": samples,
        "seconds": round(seconds, 3),
        "run": run,
        "input_activations": None
        if act is None
        else {
            "num_bits": act.bits,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
            "group_size": None,
        },
    }
