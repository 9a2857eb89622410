"""all-MiniLM-L6-v2 in OpenVINO: lowbit recipes around `presets.int8_transformer()` against NNCF's
transformer preset, STS-B dev Spearman on all 1,500 pairs (accuracy only: no timing).

The pieces are those of `openvino_nncf.py` (same calibration: the first 256 STS-B train sentences
padded to 128 tokens, same IR, same OpenVINO settings). Each recipe is one change to the preset:

- `int8_transformer`: the preset as it is; `nncf`: `nncf.quantize(model_type=TRANSFORMER)`;
- `moving_average`, `percentile`, `mse`, `entropy`: the activation calibrator;
- `asymmetric`: uint8 affine inputs for every Linear; `gelu_asymmetric`: only for the Linear after
  each GELU (its input lies in [-0.17, max]);
- `float_pv`: P @ V in float (the softmax and second attention matmul points off), as NNCF's IR;
- `smoothquant`: `smoothquant(explicit=True, alpha=0.95)` first, NNCF's smoothing;
- `bias_correction`: `lowbit.algorithms.bias_correction` after quantizing;
- `torch` / `torch_dynamic`: the preset's torch simulation (dynamic padding at evaluation),
  calibrated on the 128-token batches above or on dynamically padded ones (`minilm_static.py`'s).

    python benchmarks/minilm_openvino_recipes.py [--recipes a,b,...] [--pairs N]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr
from torch import nn

from lowbit import export_openvino, presets
from lowbit.algorithms.bias_correction import bias_correction
from lowbit.algorithms.smoothquant import smoothquant
from lowbit.config import LayerQuant, QuantConfig
from lowbit.spec import PerTensor, QuantSpec
from lowbit.workflows.quantization import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
import openvino_nncf as ov_bench
from machine import describe_line
from minilm_common import embed

RESULTS = Path(__file__).resolve().parent / "results" / "minilm_openvino_recipes.json"
ASYMMETRIC = QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor())
RECIPES = [
    "int8_transformer",
    "nncf",
    "moving_average",
    "percentile",
    "mse",
    "entropy",
    "asymmetric",
    "gelu_asymmetric",
    "float_pv",
    "smoothquant",
    "bias_correction",
    "torch",
    "torch_dynamic",
]


def config(recipe: str) -> QuantConfig:
    """The preset with the recipe's one change (none for those that change something else)."""
    base = presets.int8_transformer()
    calibrators = {"moving_average": {}, "percentile": {"p": 99.99}, "mse": {}, "entropy": {}}
    if recipe in calibrators:
        return dataclasses.replace(base, calibrator=recipe, calibrator_args=calibrators[recipe])
    if recipe == "asymmetric":
        return dataclasses.replace(base, input=ASYMMETRIC)
    if recipe == "gelu_asymmetric":
        after_gelu = {"encoder.layer.[0-9].output.dense": LayerQuant(base.weight, ASYMMETRIC)}
        return dataclasses.replace(base, overrides=after_gelu)
    if recipe == "float_pv":
        return dataclasses.replace(base, op_overrides={"*.matmul_1": None, "*.softmax_0": None})
    return base


def lowbit_model(model: nn.Module, recipe: str, calib: list[dict[str, Any]]) -> nn.Module:
    """The simulated quantized model of one recipe."""
    if recipe == "smoothquant":
        model = smoothquant(copy.deepcopy(model), calib, alpha=0.95, explicit=True)
    qmodel = quantize(model, config(recipe), calib, progress=False)
    if recipe == "bias_correction":
        bias_correction(qmodel, calib, forward=lambda m, b: m(**b), progress=False)
    return qmodel


def torch_spearman(qmodel: nn.Module, tokenizer: Any, folder: Path, n: int | None) -> float:
    """The simulation's Spearman on dev, each batch padded to its longest sentence."""
    first, second, gold = ov_bench.read_pairs(folder)
    embeddings = []
    for sentences in (first[:n], second[:n]):
        with torch.no_grad():
            embeddings.append(
                torch.cat(
                    [
                        embed(
                            qmodel,
                            dict(
                                tokenizer(
                                    sentences[i : i + 64],
                                    padding=True,
                                    truncation=True,
                                    return_tensors="pt",
                                )
                            ),
                        )
                        for i in range(0, len(sentences), 64)
                    ]
                )
            )
    cosine = (embeddings[0] * embeddings[1]).sum(1)
    return 100 * float(spearmanr(cosine.numpy(), gold[:n].numpy()).statistic)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--pairs", type=int, default=None, help="smoke runs: fewer STS pairs")
    parser.add_argument("--stsb", type=Path, default=None)
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        parser.error(f"unknown recipes {sorted(unknown)}; known: {', '.join(RECIPES)}")
    torch.set_num_threads(ov_bench.THREADS)
    print(describe_line())
    folder = ov_bench.stsb_dir(args.stsb)
    model, tokenizer = ov_bench.load_minilm()
    sentences = ov_bench.read_train_sentences(folder, ov_bench.N_CALIB_SENTENCES)
    calib = ov_bench.tokenize(tokenizer, sentences)
    first, second, gold = ov_bench.read_pairs(folder)
    n = args.pairs
    evals = (ov_bench.tokenize(tokenizer, first[:n]), ov_bench.tokenize(tokenizer, second[:n]))
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for recipe in recipes:
            start = time.perf_counter()
            rows[recipe] = score(
                recipe, model, tokenizer, calib, sentences, evals, gold[:n], folder, n, tmp
            )
            print(f"{recipe}: {rows[recipe]:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
    print("\n| recipe | STS-B dev Spearman |\n|---|---|")
    for recipe, value in rows.items():
        print(f"| {recipe} | {value:.2f} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"pairs": n or len(gold), "rows": rows}, indent=2))
    return 0


def score(
    recipe: str,
    model: nn.Module,
    tokenizer: Any,
    calib: list[dict[str, Any]],
    sentences: list[str],
    evals: tuple[list[dict[str, Any]], list[dict[str, Any]]],
    gold: torch.Tensor,
    folder: Path,
    n: int | None,
    tmp: Path,
) -> float:
    """One recipe's Spearman: OpenVINO for the IR recipes, torch for the simulations."""
    if recipe.startswith("torch"):
        if recipe == "torch_dynamic":
            calib = [
                dict(
                    tokenizer(
                        sentences[i : i + 32], padding=True, truncation=True, return_tensors="pt"
                    )
                )
                for i in range(0, len(sentences), 32)
            ]
        return torch_spearman(lowbit_model(model, recipe, calib), tokenizer, folder, n)
    xml = tmp / f"{recipe}.xml"
    if recipe == "nncf":
        fp32 = ov_bench.torch_to_ir(model, calib[0], tmp / "fp32.xml")
        numpy_calib = [ov_bench.as_numpy(b) for b in calib]
        ov_bench.nncf_quantize(fp32, numpy_calib, xml, transformer=True)
    else:
        export_openvino(lowbit_model(model, recipe, calib), calib[0], xml)
    run: Callable[[Any], Any] = ov_bench.minilm_runner(xml)
    return ov_bench.spearman(run, *evals, gold)


if __name__ == "__main__":
    raise SystemExit(main())
