"""Exactness at 4 processes: GPTQ's Hessian sum and its divided solves give the integer weights of
one process (gloo, 4 CPU workers of 1 thread each)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks
from test_distributed import Fork, gptq_and_save, mlp_batches

import lowbit
from lowbit import presets
from lowbit.algorithms._hessian import GramSum

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


def test_siblings_form_one_gptq_group() -> None:
    model = lowbit.quantize(Fork().eval(), presets.weight_only(4, 8), mlp_batches()[:1])
    layers = [qm for _, qm in gptq_module._eligible(model, "GPTQ")]
    groups = gptq_module._sibling_groups(model, layers, mlp_batches()[0], None)
    assert [len(g) for g in groups] == [3, 1]


def test_four_ranks_give_the_gptq_weights_of_one(tmp_path: Path) -> None:
    seconds = run_ranks(_four_ranks, tmp_path, world=4)
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
    assert seconds < 60
