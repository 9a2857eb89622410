"""BatchNorm folding: numerics per layer kind, detection through custom forwards, safety."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lowbit.transforms import flatten_outputs, fold_batchnorm, fold_bn_into


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial running stats and affine params, so a wrong fold shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=gen) * 2 - 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen))


def _runner(x: Tensor) -> Callable[[nn.Module], object]:
    return lambda m: m(x)


def _rel_err(a: Tensor, b: Tensor) -> float:
    return float(((a - b).abs().max() / a.abs().max()).detach())


CASES = [
    pytest.param(
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), (2, 3, 9, 9), id="conv2d"
    ),
    pytest.param(lambda: nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)), (4, 5), id="linear"),
    pytest.param(
        lambda: nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8)),
        (2, 8, 7, 7),
        id="depthwise",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)),
        (2, 4, 7, 7),
        id="grouped",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)),
        (2, 4, 5, 5),
        id="convtranspose2d-grouped",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.ConvTranspose2d(3, 5, 3), nn.BatchNorm2d(5)),
        (2, 3, 5, 5),
        id="convtranspose2d",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (2, 3, 11), id="conv1d"
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Conv3d(2, 4, 3, bias=False), nn.BatchNorm3d(4)),
        (1, 2, 5, 5, 5),
        id="conv3d-nobias",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)),
        (2, 3, 9, 9),
        id="conv2d-nobias",
    ),
    pytest.param(
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False)),
        (2, 3, 9, 9),
        id="bn-no-affine",
    ),
]


@pytest.mark.parametrize(("make", "shape"), CASES)
def test_fold_preserves_output(make: Callable[[], nn.Module], shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = make().eval()
    _randomize_bn(model)
    x = torch.randn(shape)
    ref = model(x)
    pairs = fold_batchnorm(model, _runner(x))
    assert pairs == [("0", "1")]
    assert isinstance(model[1], nn.Identity)
    assert model[0].bias is not None
    assert _rel_err(ref, model(x)) < 1e-5


def test_fold_bn_into_keeps_weight_parameter_identity() -> None:
    conv, bn = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4).eval()
    _randomize_bn(bn)
    weight = conv.weight
    x = torch.randn(1, 3, 4, 4)
    ref = bn(conv(x))
    fold_bn_into(conv, bn)
    assert conv.weight is weight
    assert _rel_err(ref, conv(x)) < 1e-5


def test_fold_bn_into_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="features"):
        fold_bn_into(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match="bn"):
        fold_bn_into(nn.Conv2d(3, 4, 1), nn.LayerNorm(4))


class CustomForward(nn.Module):
    """Conv and BN wired in forward, as real models (EfficientNet, ResNet) do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = torch.relu(self.bn(self.conv(x)))
        return {"features": y, "logits": self.head(y.mean((2, 3)))}


def test_custom_forward_is_folded() -> None:
    torch.manual_seed(0)
    model = CustomForward().eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    ref = flatten_outputs(model(x))
    assert fold_batchnorm(model, _runner(x)) == [("conv", "bn")]
    assert isinstance(model.bn, nn.Identity)
    for a, b in zip(ref, flatten_outputs(model(x)), strict=True):
        assert _rel_err(a, b) < 1e-5


class Residual(nn.Module):
    """The conv output is read again after the BN: folding would change the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv(x)
        return self.bn(c) + c


class ConvFeedsTwoModules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv(x)
        return self.bn(c) * self.other(c)


@pytest.mark.parametrize("cls", [Residual, ConvFeedsTwoModules])
def test_shared_conv_output_is_not_folded(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    _randomize_bn(model)
    x = torch.randn(2, 4, 6, 6)
    ref = model(x)
    assert fold_batchnorm(model, _runner(x)) == []
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert torch.equal(ref, model(x))


def test_guard_restores_and_raises_when_output_changes() -> None:
    """If something slips past detection, the model comes back unchanged and we raise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).eval()
    _randomize_bn(model)
    bn = model[1]
    weight = model[0].weight.detach().clone()
    calls = iter([torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)])  # non-deterministic run
    with pytest.raises(RuntimeError, match="restored"):
        fold_batchnorm(model, lambda m: m(next(calls)))
    assert model[1] is bn
    assert model[0].bias is None
    assert torch.equal(model[0].weight, weight)


def test_training_mode_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    with pytest.raises(ValueError, match="training mode"):
        fold_batchnorm(model, _runner(torch.randn(1, 3, 4, 4)))


def test_bn_without_running_stats_is_skipped() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert fold_batchnorm(model, _runner(torch.randn(2, 3, 4, 4))) == []
    assert isinstance(model[1], nn.BatchNorm2d)


def test_linear_on_sequence_is_not_folded() -> None:
    """BN1d on (N, L, C) normalizes L, not the Linear's features: not a per-channel affine."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    _randomize_bn(model)
    assert fold_batchnorm(model, _runner(torch.randn(2, 4, 4))) == []


def test_efficientnet_lite0_all_bns_folded() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-lite0").eval()
    _randomize_bn(model)
    bn_names = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    # stem + head + depthwise and project BN in each of the 16 blocks + expand BN in the 15
    # blocks that expand (all but the first): 2 + 16 * 2 + 15.
    assert len(bn_names) == 49
    x = torch.randn(1, 3, 224, 224)
    ref = model(x)
    pairs = fold_batchnorm(model, _runner(x))
    assert {bn for _, bn in pairs} == bn_names
    assert ("_conv_stem", "_bn0") in pairs and ("_conv_head", "_bn1") in pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert _rel_err(ref, model(x)) < 1e-4


# ---------------------------------------------------------------- user batches that do not fit


def _conv_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()


@pytest.mark.parametrize(
    ("batches", "error", "message"),
    [
        pytest.param(
            [torch.randn(2, 5, 9, 9)],
            ValueError,
            r"calib_data batch 0 \(a tensor of shape \(2, 5, 9, 9\), float32\) does not fit the "
            r"model: .*expected input\[2, 5, 9, 9\] to have 3 channels",
            id="channels",
        ),
        pytest.param(
            [torch.randn(2, 3, 9, 9, dtype=torch.float64)],
            TypeError,
            "calib_data batch 0 is float64 but the model's weights are float32",
            id="float64",
        ),
        pytest.param(
            [["a cat", "a dog"]],
            TypeError,
            "calib_data batch 0 gives the model a str, not tensors",
            id="strings",
        ),
        pytest.param(
            [torch.randn(2, 3, 9, 9), torch.randn(2, 3, 9, 9), (torch.randn(2, 4, 9, 9), 0)],
            ValueError,
            r"calib_data batch 2 \(a tensor of shape \(2, 4, 9, 9\), float32\) does not fit",
            id="third batch",
        ),
    ],
)
def test_batches_the_model_rejects_are_named(
    batches: list[object], error: type[Exception], message: str
) -> None:
    """The first forward pass over user data runs inside fold_batchnorm; a batch that does not
    fit used to fail there with a bare torch error. Now the error names the batch and why."""
    import lowbit

    with pytest.raises(error, match=message) as raised:
        lowbit.quantize(_conv_bn(), lowbit.presets.int8(), batches, progress=False)
    assert isinstance(raised.value.__cause__, RuntimeError | TypeError)  # torch's, kept


@pytest.mark.parametrize("algorithm", ["equalize", "smoothquant"])
def test_algorithms_name_the_batch_too(algorithm: str) -> None:
    """Algorithms that run before `quantize` make their first pass through the same wrapper."""
    from lowbit import algorithms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    with pytest.raises(TypeError, match="calib_data batch 0 is float64 but the model's weights"):
        getattr(algorithms, algorithm)(model, [torch.randn(2, 4, dtype=torch.float64)])
