"""Peak memory of `lowbit.quantize_pretrained` on a checkpoint larger than its budget.

Writes a Llama-architecture checkpoint with random weights (default about 6.2 GB of float32,
sharded safetensors, written tensor by tensor: it never exists in memory), then quantizes it
block by block, round to nearest and GPTQ W4 g128 on a few calibration tokens, each in a fresh
subprocess whose peak resident memory (ru_maxrss, which counts the imports of torch and
transformers too) is reported against the 2 GB budget.

    python benchmarks/streaming.py                        # 6.2 GB checkpoint, rtn and gptq
    python benchmarks/streaming.py --layers 4 --methods rtn   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine import describe, describe_line

REPO_ROOT = Path(__file__).resolve().parents[1]
BUDGET_MB = 2048


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": max(1, hidden // 512),
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def tensor_shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in the order transformers names them."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return shapes


def write_checkpoint(folder: Path, config: dict[str, Any], shard_bytes: int) -> int:
    """Write config.json and the shards with their index, one tensor in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in tensor_shapes(config).items():
        nbytes = 4 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in shard.items():
            n = 4 * int(torch.Size(shape).numel())
            header[name] = {
                "dtype": "F32",
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
            weight_map[name] = file
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for shape in shard.values():
                if len(shape) == 1:
                    f.write(torch.ones(shape).numpy().tobytes())
                    continue
                # in slices of rows: Linux keeps this process's peak RSS across the exec of the
                # measured child (ru_maxrss), so the writer must stay below what it measures
                for start in range(0, shape[0], 1024):
                    rows = min(1024, shape[0] - start)
                    t = torch.randn((rows, *shape[1:]), generator=gen) * 0.02
                    f.write(t.numpy().tobytes())
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


_CHILD = """
import json, pathlib, re, resource, sys, threading, time, torch
torch.set_num_threads({threads})
import lowbit
ids = torch.randint(0, {vocab}, ({windows}, {tokens}), generator=torch.Generator().manual_seed(0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()

def trace(dst=pathlib.Path({dst!r}), pattern=re.compile(r"(?:model-block-|block-)(\\d{{5}})\\.")):
    seen = set()  # a block's file appears: the peak so far, printed at once (a run cut short
    while True:   # still shows whether the peak grows with the blocks)
        time.sleep(0.5)
        found = {{int(m[1]) for f in dst.rglob("*") if (m := pattern.match(f.name))}}
        for i in sorted(found - seen):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps({{"block": i, "peak_mb": peak, "at_s": time.perf_counter() - t}}),
                  flush=True)
        seen |= found

threading.Thread(target=trace, daemon=True).start()
lowbit.quantize_pretrained({src!r}, {dst!r}, method={method!r}, bits=4, group_size=128,
                           calib=ids, format={fmt!r}, progress=False)
took = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_mb": peak / 1024, "imports_mb": base / 1024, "seconds": took}}))
"""


def measure(src: Path, dst: Path, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Quantize in a fresh process; its peak resident memory and time."""
    code = _CHILD.format(
        threads=args.threads,
        vocab=args.vocab,
        windows=args.windows,
        tokens=args.tokens,
        src=str(src),
        dst=str(dst),
        method=method,
        fmt=args.format,
    )
    env = dict(os.environ)  # this source tree's lowbit, installed or not
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryFile("w+") as errors:  # a file: a full pipe would block the child
        child = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=errors, text=True, env=env
        )
        assert child.stdout is not None
        result: dict[str, Any] = {}
        for line in child.stdout:  # a line per block written (the last may come after the
            row = json.loads(line)  # run's figures)
            if "block" not in row:
                result = row
                continue
            print(
                f"  {method} block {row['block']}: peak RSS so far {row['peak_mb']:.0f} MB "
                f"at {row['at_s']:.0f} s",
                flush=True,
            )
        if child.wait():
            errors.seek(0)
            raise SystemExit(f"{method} failed:\n{errors.read()[-3000:]}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--windows", type=int, default=2, help="calibration windows (GPTQ)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--format", default="compressed-tensors")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, help="folder for the checkpoint (kept if given)")
    args = p.parse_args()
    print(describe_line())
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        src = Path(tmp) / "ckpt"
        started = time.perf_counter()
        config = llama_config(args.layers, args.hidden, args.intermediate, args.vocab)
        size = write_checkpoint(src, config, shard_bytes=1 << 30)
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"wrote a {size / 1e9:.2f} GB checkpoint ({args.layers} blocks) in "
            f"{time.perf_counter() - started:.0f} s, peak RSS of the writer {own:.0f} MB"
        )
        rows = []
        for method in args.methods.split(","):
            r = measure(src, Path(tmp) / f"out-{method}", method, args)
            rows.append({"method": method, "checkpoint_gb": size / 1e9, **r})
            print(
                f"{method}: peak RSS {r['peak_mb']:.0f} MB (imports alone {r['imports_mb']:.0f} "
                f"MB), {r['seconds']:.0f} s; budget {BUDGET_MB} MB",
                flush=True,
            )
    print(
        "\n| method | checkpoint | peak RSS | of which imports | time |\n|---|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['method']} W4 g128 | {r['checkpoint_gb']:.2f} GB | {r['peak_mb']:.0f} MB | "
            f"{r['imports_mb']:.0f} MB | {r['seconds']:.0f} s |"
        )
    out = REPO_ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    payload = {
        "machine": describe(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    (out / "streaming.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
