"""`lowbit.diagnose` on all-MiniLM-L6-v2 static W8A8 without any fix: which points lose STS-B.

The config: `presets.int8_transformer()` with every tensor + tensor add quantized too (what a
plain static W8A8 does, as ORT's quantize_static): int8 per-channel weights, int8 per-tensor
inputs, both attention matmuls, the softmax, the residual adds and the embeddings' adds.
Diagnosis by name pattern (the six blocks' copies of a point as one), each pattern swept by the
output SQNR on --sweep sentences; the metric is the STS-B dev Spearman x100 on --pairs pairs,
calibration on STS-B train (as benchmarks/minilm_static.py).

--eager runs the model with eager attention (its attention-mask add is then a point too);
--preset-only diagnoses `presets.int8_transformer()` itself (what loss is left).

    python benchmarks/minilm_diagnose.py   # prints the diagnosis; results/minilm_diagnose.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
from machine import describe, describe_line
from minilm_common import load
from minilm_static import (
    CALIB_BATCH,
    EVAL_BATCH,
    REPO_ROOT,
    SentenceEncoder,
    spearman,
    stsb,
    tokenize,
    torch_embedder,
)

import lowbit

RESULTS = REPO_ROOT / "benchmarks" / "results" / "minilm_diagnose.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stsb", type=Path, help="folder holding stsb-en-{train,dev}.csv")
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences")
    parser.add_argument("--pairs", type=int, default=1500, help="dev pairs scored (all: 1500)")
    parser.add_argument("--sweep", type=int, default=32, help="sentences of the SQNR sweep")
    parser.add_argument("--eager", action="store_true", help="eager attention (default sdpa)")
    parser.add_argument("--preset-only", action="store_true", help="int8_transformer() as is")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(describe_line())
    folder = args.stsb or Path(os.environ.get("LOWBIT_STSB", REPO_ROOT.parent / "shared/data/stsb"))
    bert, tokenizer = load()
    if args.eager:
        bert.set_attn_implementation("eager")
    model = SentenceEncoder(bert).eval()
    train = [s for row in stsb(folder, "train") for s in row[:2]][: args.calib]
    dev = stsb(folder, "dev")[: args.pairs]
    calib = tokenize(tokenizer, train, CALIB_BATCH, padding=True, truncation=True)
    first = tokenize(tokenizer, [r[0] for r in dev], EVAL_BATCH, padding=True, truncation=True)
    pairs = (
        first,
        tokenize(tokenizer, [r[1] for r in dev], EVAL_BATCH, padding=True, truncation=True),
        [float(r[2]) for r in dev],
    )
    transformer = lowbit.presets.int8_transformer()
    config = transformer
    if not args.preset_only:
        config = dataclasses.replace(transformer, ops={**transformer.ops, "add": transformer.input})
    diagnosis = lowbit.diagnose(
        model,
        config,
        calib,
        first,
        lambda m: spearman(torch_embedder(m), pairs),
        forward=lambda m, b: m(**b),
        by="pattern",
        sweep_samples=args.sweep,
        progress=False,
    )
    print(diagnosis)
    RESULTS.parent.mkdir(exist_ok=True)
    payload = {**describe(), "threads": args.threads, "calib": len(train), "pairs": len(dev)}
    payload.update(eager=args.eager, preset_only=args.preset_only)
    name = "minilm_diagnose" + "_eager" * args.eager + "_preset" * args.preset_only
    results = RESULTS.with_name(f"{name}.json")
    results.write_text(json.dumps({**payload, **dataclasses.asdict(diagnosis)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
