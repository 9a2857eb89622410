"""all-MiniLM-L6-v2 with weight-only int8 / int4: embeddings quantized or kept in float.

For each setting: the `lowbit.save` file size, and the STS-B dev Spearman correlation of the
converted integer model's sentence embeddings (cosine similarity against the gold scores). The
STS-B folder (`stsb-en-dev.csv`: sentence 1, sentence 2, score) comes from `--stsb`, else the
LOWBIT_STSB environment variable, else `../shared/data/stsb` next to the repository; without it
only the sizes are measured.

    pip install -e '.[bench]'
    python benchmarks/minilm_embeddings.py   # a markdown table; JSON in benchmarks/results/
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from machine import describe, describe_line
from minilm_common import embed, load
from scipy.stats import spearmanr
from torch import Tensor, nn

import lowbit

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
SETTINGS: list[tuple[str, int | None, int | None, tuple[type[nn.Module], ...]]] = [
    ("FP32", None, None, ()),
    ("int8, embeddings float", 8, None, (nn.Linear,)),
    ("int8, embeddings int8 per row", 8, None, (nn.Linear, nn.Embedding)),
    ("int4 g128, embeddings float", 4, 128, (nn.Linear,)),
    ("int4 g128, embeddings int4 g128", 4, 128, (nn.Linear, nn.Embedding)),
]


def stsb_dir(given: Path | None) -> Path | None:
    folder = given or Path(os.environ.get("LOWBIT_STSB", REPO_ROOT.parent / "shared/data/stsb"))
    if not (folder / "stsb-en-dev.csv").is_file():
        print(f"STS-B dev not found in {folder} (pass --stsb DIR or set LOWBIT_STSB): sizes only")
        return None
    return folder


def read_pairs(folder: Path) -> tuple[list[str], list[str], Tensor]:
    with open(folder / "stsb-en-dev.csv", newline="") as f:
        rows = list(csv.reader(f))
    return [r[0] for r in rows], [r[1] for r in rows], torch.tensor([float(r[2]) for r in rows])


def embed_sentences(model: nn.Module, tokenizer: Any, sentences: list[str]) -> Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), BATCH):
            enc = tokenizer(sentences[i : i + BATCH], padding=True, return_tensors="pt")
            out.append(embed(model, dict(enc)))
    return torch.cat(out)


def spearman(model: nn.Module, tokenizer: Any, pairs: tuple[list[str], list[str], Tensor]) -> float:
    first, second, gold = pairs
    cosine = embed_sentences(model, tokenizer, first) * embed_sentences(model, tokenizer, second)
    return float(spearmanr(cosine.sum(1).numpy(), gold.numpy()).statistic)


def file_mb(model: nn.Module) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.lowbit"
        lowbit.save(model, path)
        return path.stat().st_size / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stsb", type=Path, help="folder holding stsb-en-dev.csv")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe_line())
    model, tokenizer = load()
    folder = stsb_dir(args.stsb)
    pairs = read_pairs(folder) if folder else None
    rows = []
    for name, bits, group, layers in SETTINGS:
        if bits is None:
            quantized, size = model, sum(p.numel() * 4 for p in model.parameters()) / 1e6
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", lowbit.LowbitWarning)
                quantized = lowbit.quantize_weights(model, bits, group_size=group, layers=layers)
            size = file_mb(quantized)
        score = spearman(quantized, tokenizer, pairs) if pairs else None
        rows.append({"setting": name, "file_mb": size, "stsb_dev_spearman": score})
        shown = "" if score is None else f"{100 * score:.2f}"
        print(f"| {name} | {size:.1f} | {shown} |", flush=True)
    results = REPO_ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    payload = {**describe(), "threads": args.threads}
    (results / "minilm_embeddings.json").write_text(json.dumps({**payload, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
