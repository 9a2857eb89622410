"""Exact reductions beyond calibration: GPTQ's Hessian sum and divided solves at 4 processes give
the integer weights of one process; auto_quantize at 2 sums its counts and errors so that every
rank picks the same layers (gloo, CPU workers of 1 thread each)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ranks import CPU_BUDGET_S, run_ranks
from test_distributed import Fork, gptq_and_save, mlp_batches
from test_distributed import _batches as cnn_batches
from test_distributed import _shard as shard_of
from torch import nn

import lowbit
from lowbit import presets
from lowbit.algorithms import adaround
from lowbit.algorithms._hessian import GramSum
from lowbit.config import QuantConfig
from lowbit.distributed import DistributedError
from lowbit.spec import PerChannel, QuantSpec

pytestmark = pytest.mark.filterwarnings("ignore::lowbit.LowbitWarning")

gptq_module = importlib.import_module("lowbit.algorithms.gptq")

# Batch sizes per rank for the 6 calibration batches (ranks 2 and 3 hold one each, rank 1 none).
SIZES = (3, 0, 2, 1)
SMALL = 2.0**-28  # six rows of it: X^T X = 3 * 2^-55, 3/8 of a unit in the last place of 1.0


def _shard(batches: list[Any], rank: int) -> list[Any]:
    start = sum(SIZES[:rank])
    return batches[start : start + SIZES[rank]]


def _gram_batches() -> list[torch.Tensor]:
    """A row of 1, then five batches of six rows of 2^-28: their X^T X sum to 1 + 5 * 3 * 2^-55,
    whose float64 value depends on the order of the additions."""
    return [torch.tensor([[1.0, 0.5]], dtype=torch.float64)] + [
        torch.full((6, 2), SMALL, dtype=torch.float64) for _ in range(5)
    ]


def _gram(batches: list[torch.Tensor], group: Any) -> torch.Tensor:
    gram = GramSum(2)
    for x in batches:
        gram.add(x.T @ x, x.shape[0])
    return gram.total(group)[0]


def _four_ranks(rank: int, out: Path) -> None:
    torch.save(_gram(_shard(_gram_batches(), rank), dist.group.WORLD), out / f"h.rank{rank}.pt")
    for act_order in (False, True):
        path = out / f"gptq.{act_order}.rank{rank}.lowbit"
        gptq_and_save(_shard(mlp_batches(), rank), path, every_rank=True, act_order=act_order)


def test_gram_sum_does_not_depend_on_the_split_where_float_sums_do() -> None:
    batches = _gram_batches()
    products = [x.T @ x for x in batches]
    in_order = sum(products[1:], products[0])
    by_rank = [sum(_shard(products, r), torch.zeros(2, 2, dtype=torch.float64)) for r in range(4)]
    assert not torch.equal(in_order, sum(by_rank[1:], by_rank[0]))  # float64 sums differ
    exact = _gram(batches, None)
    assert torch.equal(exact, _gram(list(reversed(batches)), None))
    assert float(exact[0, 0]) == 1.0 + 2.0**-51  # 1 + 15 * 2^-55, rounded once
    with pytest.raises(ValueError, match="at most"):
        gram = GramSum(1)
        for _ in range(2**15 + 1):
            gram.add(torch.ones(1, 1, dtype=torch.float64), 1)


class InPlace(nn.Module):
    """b takes the tensor a took, but changed in place by a's output: not siblings."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.clone()
        h += self.a(h)
        return self.b(h)


def _groups(model: nn.Module) -> list[int]:
    qmodel = lowbit.quantize(model.eval(), presets.weight_only(4, 8), mlp_batches()[:1])
    layers = [qm for _, qm in gptq_module._eligible(qmodel, "GPTQ")]
    return [len(g) for g in gptq_module._sibling_groups(qmodel, layers, mlp_batches()[0], None)]


def test_siblings_form_one_gptq_group() -> None:
    assert _groups(Fork()) == [3, 1]
    assert _groups(InPlace()) == [1, 1]


def test_four_ranks_give_the_gptq_weights_of_one(tmp_path: Path) -> None:
    cpu_seconds = run_ranks(_four_ranks, tmp_path, world=4)
    batches = _gram_batches()
    for r in range(4):
        assert torch.equal(torch.load(tmp_path / f"h.rank{r}.pt"), _gram(batches, None))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for act_order in (False, True):
            gptq_and_save(mlp_batches(), tmp_path / "one.lowbit", act_order=act_order)
            one = (tmp_path / "one.lowbit").read_bytes()
            for r in range(4):
                assert (tmp_path / f"gptq.{act_order}.rank{r}.lowbit").read_bytes() == one
    finally:
        torch.set_num_threads(threads)
    assert cpu_seconds < CPU_BUDGET_S


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)]
    return nn.Sequential(*layers).eval()


def _eval_set() -> tuple[torch.Tensor, torch.Tensor]:
    """61 samples labelled by the float model (61 is prime: a percentage of the 30 or 31
    samples of one rank is not one of 61 unless it is 0 or 100)."""
    x = torch.randn(61, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return x, _mlp()(x).argmax(1)


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum())


def _auto(rank: int, out: Path) -> None:
    x, y = _eval_set()
    mine = slice(0, 30) if rank == 0 else slice(30, 61)
    calib = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    config = QuantConfig(weight=QuantSpec(bits=2, granularity=PerChannel(0)))
    seen: dict[str, Any] = {}
    for sensitivity in ("output", "local"):
        mixed = lowbit.auto_quantize(
            _mlp(),
            config,
            calib[2 * rank : 2 * rank + 2],
            lambda m: (_correct(m, x[mine], y[mine]), len(y[mine])),
            max_drop=5.0,
            sensitivity=sensitivity,
            progress=False,
        )
        summary = mixed.lowbit_auto
        seen[sensitivity] = {
            "summary": str(summary),
            "ranking": summary.sensitivity,
            "accuracies": [s.accuracy for s in summary.steps],
            "final": summary.accuracy,
            "final_on_all": 100.0 * _correct(mixed, x, y) / len(y),
        }
    try:
        lowbit.auto_quantize(_mlp(), config, calib, lambda m: 90.0 + rank, progress=False)
        seen["percent"] = "no error"
    except DistributedError as error:
        seen["percent"] = str(error)
    (out / f"auto.rank{rank}.json").write_text(json.dumps(seen))


def test_auto_quantize_ranks_pick_the_same_layers(tmp_path: Path) -> None:
    cpu_seconds = run_ranks(_auto, tmp_path)
    seen = [json.loads((tmp_path / f"auto.rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]
    for sensitivity in ("output", "local"):
        result = seen[0][sensitivity]
        assert result["final"] == result["final_on_all"]  # the counts of both ranks, summed
        assert any(0 < a < 100 for a in result["accuracies"])
        assert all(abs(a * 61 / 100 - round(a * 61 / 100)) < 1e-9 for a in result["accuracies"])
    assert "different accuracies" in seen[0]["percent"]
    assert cpu_seconds < CPU_BUDGET_S


def _wide_cnn() -> nn.Module:
    """Layers of more than one 64-channel AdaRound block: a plain and a depthwise convolution
    (second moments), a 1x1 convolution whose 72 inputs take sampled rows, a Linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 72, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(72, 72, 3, padding=1, groups=72),
        nn.ReLU(),
        nn.Conv2d(72, 130, 1),
        nn.ReLU(),
        nn.AvgPool2d(8),
        nn.Flatten(),
        nn.Linear(130, 70),
    ).eval()


def _adaround_and_save(batches: list[Any], path: Path) -> None:
    model = lowbit.quantize(_wide_cnn(), presets.w4a8(None), batches, progress=False)
    adaround(model, batches, iterations=60, batch_rows=64, progress=False)
    assert len(model.lowbit_adaround.layers) == 4  # type: ignore[union-attr]
    lowbit.save(lowbit.convert(model), path, every_rank=True)


def _divided_adaround(rank: int, out: Path) -> None:
    """Three ranks, the second without batches: some layers have fewer blocks than ranks."""
    _adaround_and_save(shard_of(cnn_batches(), rank, (4, 0, 2)), out / f"ada.rank{rank}.lowbit")


def test_adaround_divided_in_blocks_gives_the_codes_of_one_process(tmp_path: Path) -> None:
    cpu_seconds = run_ranks(_divided_adaround, tmp_path, world=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _adaround_and_save(cnn_batches(), tmp_path / "ada.one.lowbit")
    finally:
        torch.set_num_threads(threads)
    one = (tmp_path / "ada.one.lowbit").read_bytes()
    for r in range(3):
        assert (tmp_path / f"ada.rank{r}.lowbit").read_bytes() == one, f"rank {r}"
    assert cpu_seconds < CPU_BUDGET_S
