"""`lowbit quantize --nproc 2`: torchrun starts `python -m lowbit` twice, each rank calibrates on
its half of the calibration batches, and rank 0 writes the file one process writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.cli.data import TensorBatches
from lowbit.cli.ranks import ShardBatches

FACTORY = "lowbit_ranks_factory:make"
FACTORY_SOURCE = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    return model.eval()
"""


def test_shards_are_whole_batches_in_rank_order() -> None:
    data = TensorBatches(torch.arange(10.0).reshape(10, 1), None, batch_size=3)  # 4 batches
    shards = [ShardBatches(data, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [2, 2, 0]
    joined = [b[0] for s in shards for b in s]
    assert all(torch.equal(a, b[0]) for a, b in zip(joined, data, strict=True))
    assert torch.equal(shards[2].example(), data.example())


def test_nproc_2_writes_the_file_of_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "lowbit_ranks_factory.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    src = str(Path(lowbit.__file__).resolve().parents[1])  # the children import this lowbit
    path = os.pathsep.join(p for p in (str(tmp_path), src, os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    x = np.random.default_rng(0).normal(size=(48, 3, 8, 8)).astype(np.float32)
    x *= np.repeat(np.geomspace(0.1, 10.0, 6), 8)[:, None, None, None]  # batches far apart
    np.save(tmp_path / "calib.npy", x)
    common = [
        "quantize", FACTORY, "--calib", str(tmp_path / "calib.npy"), "--batch-size", "8",
        "--calibrator", "entropy", "--threads", "1",
    ]  # fmt: skip
    assert main([*common, "-o", str(tmp_path / "one.lowbit")]) == 0
    capfd.readouterr()
    assert main([*common, "--nproc", "2", "-o", str(tmp_path / "two.lowbit")]) == 0
    printed = capfd.readouterr().out
    assert printed.count("wrote ") == 1  # rank 0 alone prints
    assert (tmp_path / "two.lowbit").read_bytes() == (tmp_path / "one.lowbit").read_bytes()
