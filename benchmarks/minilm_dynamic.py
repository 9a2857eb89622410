"""all-MiniLM-L6-v2 end to end: lowbit.quantize_dynamic vs FP32 and vs torch.ao dynamic quantization

Batch 32 x 128 tokens (64 varied English sentences below, padded / truncated to 128), 1 thread
(--threads).
Embedding: attention-masked mean pooling of the last hidden state, L2-normalised (as
sentence-transformers does for this model); quality = mean cosine similarity of each sentence's
embedding to the FP32 one. Latency: median over interleaved rounds (every model once per round).

    pip install -e '.[bench]'
    python benchmarks/minilm_dynamic.py  # markdown table; writes results/minilm_dynamic.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from machine import describe, describe_line
from minilm_common import EVAL, embed, load
from torch import nn

import lowbit

THREADS = 1  # see --threads
BATCH, TOKENS = 32, 128
RESULTS = Path(__file__).resolve().parent / "results" / "minilm_dynamic.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="intra-op threads, fixed for every candidate (default 1: on a shared 2-core machine "
        "2-thread timings were dominated by OpenMP thread wake-ups)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(describe_line())
    model, tokenizer = load()
    enc = tokenizer(
        EVAL, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt"
    )
    batches = [{k: v[i : i + BATCH] for k, v in enc.items()} for i in range(0, len(EVAL), BATCH)]

    t0 = time.perf_counter()
    ours = lowbit.quantize_dynamic(model)
    lowbit_quantize_s = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )
    models = {"fp32": model, "lowbit": ours, "torch_ao": ao}
    with torch.no_grad():
        t0 = time.perf_counter()
        embed(ours, batches[0])
        lowbit_first_s = time.perf_counter() - t0
        emb = {k: torch.cat([embed(m, b) for b in batches]) for k, m in models.items()}
        cos = {k: float((emb[k] * emb["fp32"]).sum(-1).mean()) for k in ("lowbit", "torch_ao")}
        worst = {k: float((emb[k] * emb["fp32"]).sum(-1).min()) for k in ("lowbit", "torch_ao")}
        times: dict[str, list[float]] = {k: [] for k in models}
        for m in models.values():
            embed(m, batches[0])
        for r in range(args.rounds):
            for k, m in models.items():
                b = batches[r % len(batches)]
                t0 = time.perf_counter()
                embed(m, b)
                times[k].append((time.perf_counter() - t0) * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "batch": BATCH,
        "tokens": TOKENS,
        "threads": args.threads,
        "rounds": args.rounds,
        "ms": ms,
        "lowbit_speedup_vs_fp32": ms["fp32"] / ms["lowbit"],
        "lowbit_speedup_vs_torch_ao": ms["torch_ao"] / ms["lowbit"],
        "torch_ao_speedup_vs_fp32": ms["fp32"] / ms["torch_ao"],
        "mean_cosine_to_fp32": cos,
        "min_cosine_to_fp32": worst,
        "lowbit_quantize_s": lowbit_quantize_s,
        "lowbit_first_batch_s": lowbit_first_s,
        **describe(),
    }
    print("| model | ms / batch (median) | speedup vs fp32 | mean cos to fp32 | min cos |")
    print("|---|---|---|---|---|")
    for k in models:
        c = f"{cos[k]:.5f} | {worst[k]:.5f}" if k in cos else "1 | 1"
        print(f"| {k} | {ms[k]:.1f} | {ms['fp32'] / ms[k]:.2f}x | {c} |")
    print(f"lowbit vs torch.ao: {result['lowbit_speedup_vs_torch_ao']:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
