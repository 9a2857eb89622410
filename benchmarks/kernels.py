"""lowbit's integer kernels against their peers, as ratios measured in the same run.

    .venv/bin/python benchmarks/kernels.py [--only dynamic weight_only conv] [--rounds N]

1. Dynamic int8 Linear, per-token activation scales (lowbit.quantize_dynamic, the route it picks,
   the `torch._int_mm` route that non-VNNI CPUs run, and the eager form that runs where lowbit's
   C++ ops could not be built), vs
   torch.ao.quantization.quantize_dynamic (fbgemm, per-tensor activations) and FP32 F.linear, at
   (M, K, N) in (1,768,768), (128,768,3072), (4096,768,768), (1,4096,4096); output error of each
   vs the float64 product. The one-token shapes again through a stack of distinct layers holding
   128 MB of int8 weights, as in decoding (weights from memory, not from cache).
2. Weight-only int8 and int4 group 128 Linear (lowbit.quantize_weights: lowbit's C++ kernels)
   at 4096x4096 vs FP32, at M=1 (decoding) and M=64 (a prompt), and at M=1 through distinct
   layers from memory.
3. EfficientNet-Lite0 at batch 32: lowbit.convert of lowbit.quantize(int8()) vs torchao PT2E +
   X86InductorQuantizer compiled with inductor, compiled FP32 and eager FP32; top-1 agreement of
   the converted model with the simulation (needs the ImageNet sample, see imagenet_sample.py).

Candidates are interleaved: each round times every candidate once, and the table reports the
median over rounds; ratios are of medians from the same run. Threads fixed (THREADS). Prints one
markdown table and writes benchmarks/results/kernels.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lowbit
from lowbit import kernels, presets
from lowbit.kernels import dynamic, native
from lowbit.workflows.conversion import convert
from lowbit.workflows.quantization import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, describe_line, kernels_used

THREADS = 1  # see --threads
RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
DYNAMIC_SHAPES = [(1, 768, 768), (128, 768, 3072), (4096, 768, 768), (1, 4096, 4096)]
WEIGHT_ONLY_TOKENS = (1, 64)
STACK_BYTES = 128 << 20  # int8 weights of the decode-stack rows: 4x a 32 MB last-level cache

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")


def interleaved(
    cands: dict[str, Callable[[], Any]],
    rounds: int,
    inner: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median milliseconds per call of each candidate, timed in interleaved rounds (by `clock`:
    wall time, or `time.process_time` for this process's CPU time on a shared machine).

    Each round starts one candidate further on: the call after a large one pays for what that
    left behind (measured: the slot after fbgemm ran a one-token Linear 1.5x slower), so every
    candidate takes every slot equally often.
    """
    for fn in cands.values():  # warm-up (and compile)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in cands}
    order = list(cands.items())
    for r in range(rounds):
        for name, fn in order[r % len(order) :] + order[: r % len(order)]:
            t0 = clock()
            for _ in range(inner):
                fn()
            times[name].append((clock() - t0) / inner * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def rel_err(y: Tensor, ref: Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def bench_dynamic(rounds: int) -> list[dict[str, Any]]:
    rows = []
    for m, k, n in DYNAMIC_SHAPES:
        row = _bench_dynamic_shape(m, k, n, rounds)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for m, k, n in DYNAMIC_SHAPES:
        if m == 1:
            row = _bench_decode_stack(k, n, rounds)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _distinct_layers(k: int, n: int) -> nn.ModuleList:
    """Distinct [k, n] Linear layers holding STACK_BYTES of int8 weights (more than the
    last-level cache), for decode-like timings: every weight comes from memory. The per-shape
    rows call one layer again and again, so its weight stays cached."""
    torch.manual_seed(0)
    depth = max(2, STACK_BYTES // (k * n))
    return nn.ModuleList(nn.Linear(k, n) for _ in range(depth)).eval()


def _stack_ms(models: dict[str, nn.Module], x: Tensor, rounds: int) -> dict[str, float]:
    """Median ms per layer of one token through each model's layers in turn (interleaved)."""

    def stack(model: nn.Module) -> Callable[[], None]:
        return lambda: [layer(x) for layer in model]  # type: ignore[union-attr]

    depth = len(next(iter(models.values())))  # type: ignore[arg-type]
    with torch.no_grad():
        total = interleaved({name: stack(model) for name, model in models.items()}, rounds)
    return {name: t / depth for name, t in total.items()}


def _bench_decode_stack(k: int, n: int, rounds: int) -> dict[str, Any]:
    """Dynamic int8: one token through `_distinct_layers`, lowbit vs fbgemm vs FP32."""
    layers = _distinct_layers(k, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fbgemm = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(layers), {nn.Linear}, dtype=torch.qint8
        )
    ours = lowbit.quantize_dynamic(layers)
    ms = _stack_ms({"fp32": layers, "fbgemm": fbgemm, "lowbit": ours}, torch.randn(1, k), rounds)
    return {
        "bench": "dynamic_stack",
        "shape": [1, k, n],
        "depth": len(layers),
        "ms": ms,
        "speedup_vs_fbgemm": ms["fbgemm"] / ms["lowbit"],
        "speedup_vs_fp32": ms["fp32"] / ms["lowbit"],
    }


def _bench_dynamic_shape(m: int, k: int, n: int, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    lin = nn.Linear(k, n).eval()
    x = torch.randn(m, k)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fbgemm = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(copy.deepcopy(lin)), {nn.Linear}, dtype=torch.qint8
        )
    ours = lowbit.quantize_dynamic(nn.Sequential(lin))
    layer = ours[0]
    bias = layer.bias if layer.bias is not None else torch.zeros(n)
    # The non-VNNI fallback: every call through torch._int_mm.
    fallback = dynamic.DynamicLinearWeights(
        layer.weight_codes(), layer.weight_scale, bias, routes=("int_mm",)
    )

    def int_mm() -> Tensor:
        return dynamic.dynamic_int8_linear(x, fallback)

    def eager() -> Tensor:  # the same routes without lowbit's C++ ops (no compiler)
        kernels.set_compile(False)
        try:
            return ours(x)
        finally:
            kernels.set_compile(True)

    cands = {
        "fp32": lambda: lin(x),
        "fbgemm": lambda: fbgemm(x),
        "lowbit": lambda: ours(x),
        "lowbit_int_mm": int_mm,
        "lowbit_eager": eager,
    }
    t0 = time.perf_counter()
    with torch.no_grad():
        ours(x)
        first_call_s = time.perf_counter() - t0
        ms = interleaved(cands, rounds, inner=20 if m * k * n < 1e8 else 1)
        err = {
            "fbgemm": rel_err(fbgemm(x), ref),
            "lowbit": rel_err(ours(x), ref),
            "lowbit_int_mm": rel_err(int_mm(), ref),
            "lowbit_eager": rel_err(eager(), ref),
        }
    weights = layer.current_packs().get("dynamic")
    assert weights is not None
    return {
        "bench": "dynamic",
        "shape": [m, k, n],
        "route": dynamic.choose_route(m, k, n, weights.routes, native.ops() is not None),
        "ms": ms,
        "speedup_vs_fbgemm": ms["fbgemm"] / ms["lowbit"],
        "speedup_vs_fp32": ms["fp32"] / ms["lowbit"],
        "int_mm_speedup_vs_fbgemm": ms["fbgemm"] / ms["lowbit_int_mm"],
        "eager_speedup_vs_fbgemm": ms["fbgemm"] / ms["lowbit_eager"],
        "rel_err": err,
        "first_call_s": first_call_s,
    }


def bench_weight_only(rounds: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    lin = nn.Linear(4096, 4096).eval()
    w8 = lowbit.quantize_weights(nn.Sequential(lin), bits=8)
    w4 = lowbit.quantize_weights(nn.Sequential(lin), bits=4, group_size=128)
    assert w8[0].kernel == "int8pack" and w4[0].kernel == "int4pack"
    rows = []
    for m in WEIGHT_ONLY_TOKENS:  # decoding, and a prompt
        x = torch.randn(m, 4096)
        ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        models = {"fp32": lin, "int8": w8, "int4": w4}
        with torch.no_grad():
            ms = interleaved({name: partial(model, x) for name, model in models.items()}, rounds, 5)
            err = {"int8": rel_err(w8(x), ref), "int4": rel_err(w4(x), ref)}
        row = {
            "bench": "weight_only",
            "shape": [m, 4096, 4096],
            "ms": ms,
            "int8_speedup_vs_fp32": ms["fp32"] / ms["int8"],
            "int4_speedup_vs_fp32": ms["fp32"] / ms["int4"],
            "rel_err": err,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    x = torch.randn(1, 4096)
    layers = _distinct_layers(4096, 4096)
    stacked = {
        "fp32": layers,
        "int8": lowbit.quantize_weights(layers, bits=8),
        "int4": lowbit.quantize_weights(layers, bits=4, group_size=128),
    }
    ms = _stack_ms(stacked, x, rounds)
    stack_row = {
        "bench": "weight_only_stack",
        "shape": [1, 4096, 4096],
        "depth": len(layers),
        "ms": ms,
        "int8_speedup_vs_fp32": ms["fp32"] / ms["int8"],
        "int4_speedup_vs_fp32": ms["fp32"] / ms["int4"],
    }
    print(json.dumps(stack_row), flush=True)
    return [*rows, stack_row]


def bench_conv(rounds: int, n_eval: int) -> list[dict[str, Any]]:
    from efficientnet_lite0 import load_model
    from imagenet_sample import calib_eval_split, find_data_dir

    data_dir = find_data_dir(None, "conv rows")
    if data_dir is None:
        return []
    split = calib_eval_split(data_dir, 64)
    calib, rest, labels = split.calib, split.evals, split.labels
    calib_batches = [calib[i : i + 32] for i in range(0, 64, 32)]
    model = load_model()
    x = rest[:32].contiguous()
    notes: list[str] = []

    t0 = time.perf_counter()
    sim = quantize(model, presets.int8(), calib_batches, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int_model = convert(sim)
    quantize_s = time.perf_counter() - t0
    used = kernels_used(int_model)

    cands: dict[str, Callable[[], Any]] = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        int_model(x)
        lowbit_first_s = time.perf_counter() - t0
        cands["lowbit"] = lambda: int_model(x)
        cands["fp32"] = lambda: model(x)
        t0 = time.perf_counter()
        fp32_c = torch.compile(copy.deepcopy(model))
        fp32_c(x)
        compile_fp32_s = time.perf_counter() - t0
        cands["fp32_compiled"] = lambda: fp32_c(x)
        try:  # the converted model compiled whole: inductor fuses the float ops around the convs
            t0 = time.perf_counter()
            int_c = torch.compile(int_model)
            int_c(x)
            compile_lowbit_s: float | None = time.perf_counter() - t0
            cands["lowbit_compiled"] = lambda: int_c(x)
        except Exception as error:
            notes.append(f"torch.compile of the lowbit model failed: {type(error).__name__}")
            compile_lowbit_s = None
        pt2e_quantized = None
        try:
            pt2e, pt2e_quantized, compile_pt2e_s = _torchao_pt2e(model, calib_batches, x)
            cands["torchao_pt2e"] = lambda: pt2e(x)
        except Exception as error:  # torchao missing or broken: say so, keep the FP32 peers
            notes.append(f"torchao PT2E unavailable: {type(error).__name__}: {error}")
            compile_pt2e_s = None
        ms = interleaved(cands, rounds)

        agree, total, max_diff, right_sim, right_int = 0, 0, 0.0, 0, 0
        for i in range(0, min(n_eval, len(rest)), 32):
            b, lab = rest[i : i + 32], labels[i : i + 32]
            ys, yi = sim(b), int_model(b)
            agree += int((ys.argmax(1) == yi.argmax(1)).sum())
            right_sim += int((ys.argmax(1) == lab).sum())
            right_int += int((yi.argmax(1) == lab).sum())
            total += len(b)
            max_diff = max(max_diff, float((ys - yi).abs().max()))
    row: dict[str, Any] = {
        "bench": "conv",
        "model": "efficientnet-lite0",
        "batch": 32,
        "ms": ms,
        "speedup_vs_fp32": ms["fp32"] / ms["lowbit"],
        "speedup_vs_fp32_compiled": ms["fp32_compiled"] / ms["lowbit"],
        "kernels": used,
        "top1_agreement_with_sim": agree / max(total, 1),
        "agreement_images": total,
        "top1_sim": right_sim / max(total, 1),
        "top1_lowbit": right_int / max(total, 1),
        "max_logit_diff_vs_sim": max_diff,
        "quantize_convert_s": quantize_s,
        "lowbit_first_call_s": lowbit_first_s,
        "compile_fp32_s": compile_fp32_s,
        "compile_lowbit_s": compile_lowbit_s,
        "compile_pt2e_s": compile_pt2e_s,
        "pt2e_quantized_layers": pt2e_quantized,
        "notes": notes,
    }
    if "torchao_pt2e" in ms:
        row["speedup_vs_torchao_pt2e"] = ms["torchao_pt2e"] / ms["lowbit"]
    if "torchao_pt2e" in ms and "lowbit_compiled" in ms:
        row["compiled_speedup_vs_torchao_pt2e"] = ms["torchao_pt2e"] / ms["lowbit_compiled"]
    print(json.dumps(row), flush=True)
    return [row]


def _torchao_pt2e(
    model: nn.Module, calib: list[Tensor], x: Tensor
) -> tuple[Callable[..., Any], str, float]:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    t0 = time.perf_counter()
    exported = torch.export.export(copy.deepcopy(model).eval(), (x,)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    for b in calib:
        prepared(b)
    converted = convert_pt2e(prepared)
    convs = [n for n in converted.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    dq_weights = sum(
        1
        for n in convs
        if len(n.args) > 1
        and getattr(n.args[1], "target", None) is not None
        and "dequantize" in str(n.args[1].target)
    )
    compiled = torch.compile(converted)
    compiled(x)
    return compiled, f"{dq_weights} of {len(convs)} conv2d", time.perf_counter() - t0


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| bench | case | timings (ms, median) | ratio(s) | error / agreement |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ms = ", ".join(f"{k} {v:.3f}" for k, v in r["ms"].items())
        if r["bench"] == "dynamic":
            ratio = (
                f"vs fbgemm {r['speedup_vs_fbgemm']:.2f}x, vs fp32 {r['speedup_vs_fp32']:.2f}x, "
                f"int_mm route vs fbgemm {r['int_mm_speedup_vs_fbgemm']:.2f}x, "
                f"without the C++ ops vs fbgemm {r['eager_speedup_vs_fbgemm']:.2f}x"
            )
            err = ", ".join(f"{k} {v:.2e}" for k, v in r["rel_err"].items())
            case = "x".join(map(str, r["shape"])) + f" ({r['route']})"
        elif r["bench"] == "dynamic_stack":
            ratio = f"vs fbgemm {r['speedup_vs_fbgemm']:.2f}x, vs fp32 {r['speedup_vs_fp32']:.2f}x"
            err = "as the per-shape row"
            case = "x".join(map(str, r["shape"])) + f", {r['depth']} distinct layers, per layer"
        elif r["bench"] in ("weight_only", "weight_only_stack"):
            ratio = (
                f"int8 vs fp32 {r['int8_speedup_vs_fp32']:.2f}x, "
                f"int4 vs fp32 {r['int4_speedup_vs_fp32']:.2f}x"
            )
            if r["bench"] == "weight_only":
                err = ", ".join(f"{k} {v:.2e}" for k, v in r["rel_err"].items())
                case = "x".join(map(str, r["shape"]))
            else:
                err = "as the per-shape row"
                case = "x".join(map(str, r["shape"])) + f", {r['depth']} distinct layers, per layer"
        else:
            parts = [
                f"vs fp32 {r['speedup_vs_fp32']:.2f}x",
                f"vs fp32 compiled {r['speedup_vs_fp32_compiled']:.2f}x",
            ]
            if "speedup_vs_torchao_pt2e" in r:
                parts.append(f"vs torchao PT2E {r['speedup_vs_torchao_pt2e']:.2f}x")
            if "compiled_speedup_vs_torchao_pt2e" in r:
                parts.append(
                    f"lowbit compiled vs torchao PT2E {r['compiled_speedup_vs_torchao_pt2e']:.2f}x"
                )
            ratio = ", ".join(parts)
            err = (
                f"top-1 agreement with sim {r['top1_agreement_with_sim']:.4f} "
                f"({r['agreement_images']} images; top-1 sim {r['top1_sim']:.4f}, "
                f"lowbit {r['top1_lowbit']:.4f}), max logit diff {r['max_logit_diff_vs_sim']:.3g}"
            )
            case = f"{r['model']} b{r['batch']}"
        lines.append(f"| {r['bench']} | {case} | {ms} | {ratio} | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=["dynamic", "weight_only", "conv"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--eval-images", type=int, default=192)
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
    rows: list[dict[str, Any]] = []
    if "dynamic" in args.only:
        rows += bench_dynamic(args.rounds)
    if "weight_only" in args.only:
        rows += bench_weight_only(args.rounds)
    if "conv" in args.only:
        rows += bench_conv(max(5, args.rounds // 2), args.eval_images)
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged = {
        r["bench"] + ":" + "x".join(map(str, r.get("shape", [r.get("model")]))): r
        for r in previous.get("rows", [])
    }
    merged.update(
        {r["bench"] + ":" + "x".join(map(str, r.get("shape", [r.get("model")]))): r for r in rows}
    )
    out = {
        "threads": args.threads,
        "torch": torch.__version__,
        "compile": kernels.compile_enabled(),
        **describe(),
        "rows": list(merged.values()),
    }
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
