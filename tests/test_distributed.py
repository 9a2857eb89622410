"""lowbit inside torch.distributed: 2 CPU processes (gloo, 1 thread each) spawned per test.

The promise under test: the same model, bit for bit, whatever the number of processes. The
world-size-1 reference runs here, in the test's own process (one thread, as the workers); the
2-rank runs shard the same batches and must write byte-identical `lowbit.save` files and ONNX
exports. Failures (another model or config on one rank, a rank that raises, no data anywhere,
a failed write) must end with an error on every rank within the process group's timeout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ranks import CPU_BUDGET_S, run_ranks
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import lowbit
from lowbit import presets
from lowbit.algorithms import adaround, awq, bias_correction, equalize, gptq, smoothquant
from lowbit.calib import CALIBRATORS, Histogram, MovingAverageMinMax
from lowbit.cli import demo
from lowbit.distributed import active_group, step

# The small models here leave layers in float or without integer kernels; that is not tested.
pytestmark = pytest.mark.filterwarnings("ignore::lowbit.LowbitWarning")

WORLD = 2
TIMEOUT_S = 30  # the process group's timeout: the longest any rank may wait for another


def _model(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding matters
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _batches() -> list[torch.Tensor]:
    """Six batches whose ranges differ widely, so the ranks' histograms start far apart."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 1, 8, 8, generator=g) * 4.0**i for i in range(-2, 4)]


def _shard(batches: list[Any], rank: int, sizes: tuple[int, ...]) -> list[Any]:
    start = sum(sizes[:rank])
    return batches[start : start + sizes[rank]]


def _quantize_and_write(batches: list[Any], out: Path, tag: str, calibrator: str) -> None:
    """quantize -> export_onnx -> convert -> save, the files named after `tag`."""
    model = lowbit.quantize(_model(), presets.int8(calibrator), batches, progress=False)
    lowbit.export_onnx(model, _batches()[0], out / f"{tag}.onnx")
    lowbit.save(lowbit.convert(model), out / f"{tag}.lowbit")
    if dist.is_initialized():  # every rank's own model, to check that the ranks agree
        rank = dist.get_rank()
        lowbit.save(lowbit.convert(model), out / f"{tag}.rank{rank}.lowbit", every_rank=True)


def _run(scenario: str, out: Path) -> float:
    """Spawn WORLD workers running `scenario`; the most CPU seconds a rank spent in it."""
    return run_ranks(_SCENARIOS[scenario], out, WORLD, TIMEOUT_S)


def _same_files(rank: int, out: Path) -> None:
    """Every calibrator, shards of 3 + 3 batches, then 6 + 0 (a rank without data)."""
    for calibrator in CALIBRATORS:
        _quantize_and_write(_shard(_batches(), rank, (3, 3)), out, f"{calibrator}.w2", calibrator)
    for calibrator in ("minmax", "moving_average", "entropy"):
        shard = _shard(_batches(), rank, (0, 6))
        _quantize_and_write(shard, out, f"{calibrator}.empty", calibrator)


def _calibrator_sync(rank: int, out: Path) -> None:
    """Histograms over ranges 2^-3 and 2^7 summed exactly; moving averages outside a sharded
    pass (QAT's sync_ranges) merged by batch count in rank order."""
    batches = _batches()
    histogram, average = Histogram(64), MovingAverageMinMax(0.5)
    for x in _shard(batches, rank, (2, 4)):
        histogram.observe(x)
        average.observe(x)
    histogram.all_reduce(dist.group.WORLD)
    average.sync(dist.group.WORLD)
    state = {"histogram": histogram.state_dict(), "average": average.state_dict()}
    torch.save(state, out / f"sync.rank{rank}.pt")


def _failures(rank: int, out: Path) -> None:
    """Each case must raise on both ranks; record what each rank saw and how long it took."""
    seen: dict[str, list[Any]] = {}
    batches = _shard(_batches(), rank, (3, 3))
    bad = [torch.zeros(4, 1, 5, 5)] if rank == 1 else batches  # a shape the model rejects
    cases: dict[str, Callable[[], object]] = {
        "config": lambda: lowbit.quantize(
            _model(), presets.int8("minmax" if rank == 0 else "mse"), batches, progress=False
        ),
        "model": lambda: lowbit.quantize(_model(4 + rank), presets.int8(), batches, progress=False),
        "raises": lambda: lowbit.quantize(_model(), presets.int8(), bad, progress=False),
        "empty": lambda: lowbit.quantize(_model(), presets.int8(), [], progress=False),
        "write": lambda: lowbit.save(
            lowbit.convert(lowbit.quantize(_model(), presets.int8(), batches, progress=False)),
            out / "missing-folder" / "model.lowbit",
        ),
    }
    for name, case in cases.items():
        start = time.perf_counter()
        try:
            case()
            seen[name] = ["no error", "", time.perf_counter() - start]
        except Exception as error:
            seen[name] = [type(error).__name__, str(error), time.perf_counter() - start]
    (out / f"failures.rank{rank}.json").write_text(json.dumps(seen))


def _train(net: nn.Module, data: demo.Digits, rank: int, steps: int) -> None:
    """`steps` SGD steps of 32 digits from this rank's half of the training set."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()
    x, y = data.x_train[rank::WORLD], data.y_train[rank::WORLD]
    for i in range(0, steps * 32, 32):
        loss = nn.functional.cross_entropy(net(x[i : i + 32]), y[i : i + 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _qat(rank: int, out: Path) -> None:
    """QAT of the digits CNN under DistributedDataParallel, each rank on its half of the data;
    sync_ranges makes the ranks' activation ranges, and so their integer models, the same."""
    data = demo.load_digits()
    net = demo.DigitsNet()
    net.load_state_dict(torch.load(out / "digits.pt"))
    calib = demo.calibration_batches(data)[rank::WORLD]
    model = lowbit.prepare_qat(net, presets.int8(), calib, progress=False)
    _train(DistributedDataParallel(model), data, rank, steps=5)
    trackers = [q.calibrator for q in model.modules() if getattr(q, "track", False)]
    torch.save([c.state_dict() for c in trackers], out / f"qat.before.rank{rank}.pt")
    lowbit.sync_ranges(model)
    converted = lowbit.convert(model.eval())
    lowbit.save(converted, out / f"qat.rank{rank}.lowbit", every_rank=True)
    accuracy = demo.accuracy(converted, data.x_test, data.y_test)
    (out / f"qat.rank{rank}.json").write_text(json.dumps(accuracy))


class Fork(nn.Module):
    """Three layers on one input (as an attention block's query, key and value: one GPTQ group
    whose solves the ranks divide), then one on their result (solved alone: its rows divided)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(16, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.a(x)) * self.b(x) + self.c(x))


def gptq_and_save(
    batches: list[Any], path: Path, every_rank: bool = False, act_order: bool = False
) -> None:
    """W4 per-group weights (groups of 8) by GPTQ over `batches`, saved converted."""
    model = lowbit.quantize(Fork().eval(), presets.weight_only(4, 8), batches, progress=False)
    gptq(model, batches, act_order=act_order, progress=False)
    lowbit.save(lowbit.convert(model), path, every_rank=every_rank)


def mlp_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 16, generator=g) * (1 + torch.arange(16.0)) for _ in range(6)]


def _ln_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _smoothed(batches: list[Any]) -> dict[str, torch.Tensor]:
    return smoothquant(_ln_mlp(), batches).state_dict()


def _awq_state(batches: list[Any]) -> dict[str, torch.Tensor]:
    model = lowbit.quantize(_ln_mlp(), presets.weight_only(4, 8), batches, progress=False)
    return awq(model, batches, grid=5, progress=False).state_dict()


def _cnn_algorithm(name: str, batches: list[Any], path: Path, every_rank: bool = False) -> None:
    """bias_correction or adaround (20 steps) on the int8 CNN, saved converted."""
    model = lowbit.quantize(_model(), presets.int8(), batches, progress=False)
    if name == "bias_correction":
        bias_correction(model, batches, progress=False)
    else:
        adaround(model, batches, iterations=20, progress=False)
    lowbit.save(lowbit.convert(model), path, every_rank=every_rank)


def _equalized(batches: list[Any]) -> dict[str, torch.Tensor]:
    """Cross-layer equalization of a ReLU6 CNN, whose bounded pairs need activation maxima."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU6(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten()
    ).eval()
    return equalize(model, batches, relu6="bounded", progress=False).state_dict()


def _algorithms(rank: int, out: Path) -> None:
    """GPTQ, AWQ, bias correction and AdaRound over shards of 4 + 2 batches; SmoothQuant over
    6 + 0."""
    for name in ("bias_correction", "adaround"):
        shard = _shard(_batches(), rank, (4, 2))
        _cnn_algorithm(name, shard, out / f"{name}.rank{rank}.lowbit", every_rank=True)
    torch.save(_equalized(_shard(_batches(), rank, (4, 2))), out / f"cle.rank{rank}.pt")
    batches = mlp_batches()
    torch.save(_awq_state(_shard(batches, rank, (4, 2))), out / f"awq.rank{rank}.pt")
    gptq_and_save(_shard(batches, rank, (4, 2)), out / "gptq.w2.lowbit")
    gptq_and_save(_shard(batches, rank, (4, 2)), out / f"gptq.rank{rank}.lowbit", True)
    torch.save(_smoothed(_shard(batches, rank, (0, 6))), out / f"smooth.rank{rank}.pt")


def _dead_rank(rank: int, out: Path) -> None:
    """Rank 1 leaves without calibrating; rank 0 must get an error, not wait forever."""
    if rank == 1:
        return
    start = time.perf_counter()
    try:
        lowbit.quantize(_model(), presets.int8(), _batches(), progress=False)
        seen = ["no error", time.perf_counter() - start]
    except Exception as error:  # what rank 0 raised is the result
        seen = [type(error).__name__, time.perf_counter() - start]
    (out / "dead.json").write_text(json.dumps(seen))


def _fsdp(rank: int, out: Path) -> None:
    """QAT under FSDP2 (fully_shard): convert and export refuse the sharded model with an error
    that names the way out; the full state dict loaded into an unsharded prepare_qat copy
    converts, alike on each rank."""
    data = demo.load_digits()
    calib = demo.calibration_batches(data)[rank::WORLD]
    torch.manual_seed(0)
    model = lowbit.prepare_qat(demo.DigitsNet(), presets.int8(), calib, progress=False)
    fully_shard(model)
    _train(model, data, rank, steps=3)
    lowbit.sync_ranges(model)
    errors = []
    for call in (
        lambda: lowbit.convert(model.eval()),
        lambda: lowbit.export_onnx(model, calib[0], out / "fsdp.onnx", every_rank=True),
    ):
        try:
            call()
            errors.append("no error")
        except TypeError as caught:
            errors.append(str(caught))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    torch.manual_seed(0)
    plain = lowbit.prepare_qat(demo.DigitsNet(), presets.int8(), calib, progress=False)
    plain.load_state_dict(full)
    lowbit.save(lowbit.convert(plain.eval()), out / f"fsdp.rank{rank}.lowbit", every_rank=True)
    (out / f"fsdp.rank{rank}.json").write_text(json.dumps(errors))


_SCENARIOS: dict[str, Callable[[int, Path], None]] = {
    "same_files": _same_files,
    "calibrator_sync": _calibrator_sync,
    "failures": _failures,
    "qat": _qat,
    "algorithms": _algorithms,
    "dead_rank": _dead_rank,
    "fsdp": _fsdp,
}


@pytest.fixture()
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_ranks_write_the_files_of_one(tmp_path: Path, one_thread: None) -> None:
    cpu_seconds = _run("same_files", tmp_path)
    batches = _batches()
    for calibrator in CALIBRATORS:
        _quantize_and_write(batches, tmp_path, f"{calibrator}.w1", calibrator)
    for calibrator in CALIBRATORS:
        ranks = [(tmp_path / f"{calibrator}.w2.rank{r}.lowbit").read_bytes() for r in (0, 1)]
        assert ranks[0] == ranks[1], f"{calibrator}: the ranks disagree"
        assert ranks[0] == (tmp_path / f"{calibrator}.w2.lowbit").read_bytes()
        for suffix in ("lowbit", "onnx"):
            one = (tmp_path / f"{calibrator}.w1.{suffix}").read_bytes()
            two = (tmp_path / f"{calibrator}.w2.{suffix}").read_bytes()
            assert one == two, f"{calibrator}: world size 2 wrote another {suffix} file"
    for calibrator in ("minmax", "moving_average", "entropy"):  # rank 0 without batches
        for suffix in ("lowbit", "onnx"):
            one = (tmp_path / f"{calibrator}.w1.{suffix}").read_bytes()
            assert one == (tmp_path / f"{calibrator}.empty.{suffix}").read_bytes(), calibrator
    assert not list(tmp_path.glob("*.w2.rank*.onnx"))  # only rank 0 wrote the exports
    assert cpu_seconds < CPU_BUDGET_S


def test_calibrator_states_sync_exactly(tmp_path: Path) -> None:
    _run("calibrator_sync", tmp_path)
    batches = _batches()
    histogram = Histogram(64)
    for x in batches:
        histogram.observe(x)
    shards = [MovingAverageMinMax(0.5), MovingAverageMinMax(0.5)]
    for rank, shard in enumerate(shards):
        for x in _shard(batches, rank, (2, 4)):
            shard.observe(x)
    shards[0].merge(shards[1])
    for rank in (0, 1):
        state = torch.load(tmp_path / f"sync.rank{rank}.pt")
        for key, value in histogram.state_dict().items():
            assert torch.equal(state["histogram"][key], value), key
        for key, value in shards[0].state_dict().items():
            assert torch.equal(state["average"][key], value), key


def test_failures_raise_on_every_rank_in_time(tmp_path: Path) -> None:
    cpu_seconds = _run("failures", tmp_path)
    expected = {
        "config": ("DistributedError", "differ"),
        "model": ("DistributedError", "differ"),
        "raises": ("DistributedError", "rank 1"),
        "empty": ("ValueError", "empty on every rank"),
        "write": ("DistributedError", "rank 0"),
    }
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"failures.rank{rank}.json").read_text())
        for case, (kind, words) in expected.items():
            got_kind, message, took = seen[case]
            assert got_kind == kind, f"rank {rank}, {case}: {got_kind}: {message}"
            assert words in message, f"rank {rank}, {case}: {message}"
            assert took < TIMEOUT_S, f"rank {rank}, {case} took {took:.1f} s"
    assert cpu_seconds < CPU_BUDGET_S


def test_outside_a_group_nothing_is_synchronized() -> None:
    assert not dist.is_initialized()
    assert active_group() is None
    with pytest.raises(ValueError, match="not initialized"):
        active_group(group=object())
    with pytest.raises(KeyError), step(None, "alone"):  # errors pass through unchanged
        raise KeyError("x")


def test_qat_under_ddp_converts_to_one_model(tmp_path: Path, digits_net: nn.Module) -> None:
    torch.save(digits_net.state_dict(), tmp_path / "digits.pt")
    cpu_seconds = _run("qat", tmp_path)
    before = [torch.load(tmp_path / f"qat.before.rank{r}.pt") for r in (0, 1)]
    assert any(  # each rank tracked its own batches: without sync_ranges they would differ
        not torch.equal(a["max"], b["max"]) for a, b in zip(*before, strict=True)
    )
    files = [(tmp_path / f"qat.rank{r}.lowbit").read_bytes() for r in (0, 1)]
    assert files[0] == files[1]
    accuracies = [json.loads((tmp_path / f"qat.rank{r}.json").read_text()) for r in (0, 1)]
    assert accuracies[0] == accuracies[1] > 80.0
    assert cpu_seconds < CPU_BUDGET_S


def test_algorithms_reduce_over_ranks(tmp_path: Path, one_thread: None) -> None:
    cpu_seconds = _run("algorithms", tmp_path)
    for name in ("bias_correction", "adaround"):
        _cnn_algorithm(name, _batches(), tmp_path / f"{name}.w1.lowbit")
        one = (tmp_path / f"{name}.w1.lowbit").read_bytes()
        for rank in (0, 1):
            assert (tmp_path / f"{name}.rank{rank}.lowbit").read_bytes() == one, name
    gptq_and_save(mlp_batches(), tmp_path / "gptq.w1.lowbit")
    files = [(tmp_path / f"gptq.rank{r}.lowbit").read_bytes() for r in (0, 1)]
    assert files[0] == files[1] == (tmp_path / "gptq.w2.lowbit").read_bytes()
    assert files[0] == (tmp_path / "gptq.w1.lowbit").read_bytes()
    smoothed, scaled = _smoothed(mlp_batches()), _awq_state(mlp_batches())
    assert not torch.equal(smoothed["1.weight"], _ln_mlp()[1].weight)  # smoothing changed it
    assert not torch.equal(scaled["0.weight"], _ln_mlp()[0].weight)  # AWQ folded into the norm
    equalized = _equalized(_batches())
    for name, one in (("smooth", smoothed), ("awq", scaled), ("cle", equalized)):
        for rank in (0, 1):
            two = torch.load(tmp_path / f"{name}.rank{rank}.pt")
            assert one.keys() == two.keys(), name
            assert all(torch.equal(one[k], two[k]) for k in one), f"{name}, rank {rank}"
    assert cpu_seconds < CPU_BUDGET_S


def test_a_rank_that_leaves_ends_the_others_wait(tmp_path: Path) -> None:
    _run("dead_rank", tmp_path)
    kind, took = json.loads((tmp_path / "dead.json").read_text())
    assert kind != "no error"
    assert took < TIMEOUT_S + 5


def test_qat_under_fsdp2_converts_through_the_full_state_dict(tmp_path: Path) -> None:
    _run("fsdp", tmp_path)
    for rank in (0, 1):
        errors = json.loads((tmp_path / f"fsdp.rank{rank}.json").read_text())
        for what, error in zip(("convert", "export_onnx"), errors, strict=True):
            assert error.startswith(f"lowbit.{what} needs whole weights"), error
            assert "fully_shard" in error and "get_model_state_dict" in error, error
    assert not (tmp_path / "fsdp.onnx").exists()
    files = [(tmp_path / f"fsdp.rank{r}.lowbit").read_bytes() for r in (0, 1)]
    assert files[0] == files[1]
