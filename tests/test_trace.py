"""`lowbit.transforms.trace`: one watched forward pass, the calls and tensors it records."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.transforms.trace import trace


class Block(nn.Module):
    """conv -> relu, plus a residual add, twice: two `add` calls by the same module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.conv(x))
        z = y + x
        return z + y.shape[1]  # a metadata read, then a second add


def _model() -> nn.Module:
    return nn.Sequential(Block(), nn.Flatten()).eval()


def test_records_calls_with_their_caller_scope_and_index() -> None:
    seen = trace(_model(), lambda m: m(torch.randn(2, 3, 4, 4)))
    adds = [c for c in seen.calls if c.op == "add"]
    assert [(c.caller, c.index, c.scope) for c in adds] == [
        ("0", 0, ("", "0")),
        ("0", 1, ("", "0")),
    ]
    conv = next(c for c in seen.calls if c.module == "0.conv")
    assert conv.op == "Conv2d" and conv.caller == "0" and conv.func is None
    f_conv = next(c for c in seen.calls if c.op == "conv2d")
    assert f_conv.caller == "0.conv" and f_conv.module is None and f_conv.func is F.conv2d
    assert seen.module_calls() == {"": 1, "0": 1, "0.conv": 1, "0.act": 1, "1": 1}
    assert not any(c.op in ("shape", "size") for c in seen.calls)  # metadata is not a use


def test_tensor_identities_link_producers_to_consumers() -> None:
    seen = trace(_model(), lambda m: m(torch.randn(2, 3, 4, 4)))
    act = next(c for c in seen.calls if c.module == "0.act")
    first_add, second_add = (c for c in seen.calls if c.op == "add")
    assert act.output is not None and act.output.shape == (2, 3, 4, 4)
    assert first_add.first == act.output  # y + x reads the ReLU's output
    assert second_add.first == first_add.output and second_add.inputs == (first_add.output,)
    assert second_add.args[1] == 3  # non-tensor arguments are kept as they are
    assert first_add.output is not None and first_add.output.id != act.output.id
    assert first_add.inputs == (act.output, first_add.args[1])


def test_freed_tensors_never_share_an_identity_and_in_place_keeps_it() -> None:
    class Temporaries(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            for _ in range(4):
                t = x * 2.0  # freed at once: Python may reuse its id() for the next one
                del t
            return torch.relu_(x * 3.0)

    seen = trace(Temporaries(), lambda m: m(torch.randn(5)))
    muls = [c.output for c in seen.calls if c.op == "mul"]
    assert len({v.id for v in muls if v is not None}) == 5
    relu = next(c for c in seen.calls if c.op == "relu_")
    assert relu.output == relu.first == muls[-1]


def test_keeps_no_activation_alive_unless_asked() -> None:
    kept: list[weakref.ref[Tensor]] = []

    class Spy(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            y = x + 1.0
            kept.append(weakref.ref(y))
            return y.sum()

    seen = trace(Spy(), lambda m: m(torch.randn(3)))
    gc.collect()
    assert kept[0]() is None and seen.tensors == {}
    seen = trace(Spy(), lambda m: m(torch.randn(3)), keep_tensors=True)
    add = next(c for c in seen.calls if c.op == "add")
    assert add.output is not None and seen.tensors[add.output.id] is kept[1]()


def test_hooks_are_removed_also_when_the_pass_raises() -> None:
    model = _model()

    def broken(m: nn.Module) -> object:
        m(torch.randn(2, 3, 4, 4))
        raise KeyError("boom")

    class Raises(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise KeyError("inside a module")

    inner = nn.Sequential(nn.ReLU(), Raises())
    for m, run in ((model, broken), (inner, lambda m: m(torch.randn(2)))):
        with pytest.raises(KeyError):  # the model's own error, not one of the tracer's hooks
            trace(m, run)
        assert all(not s._forward_pre_hooks and not s._forward_hooks for s in m.modules())
        assert not torch.overrides._get_current_function_mode_stack()


def test_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="model"):
        trace("not a model", lambda m: m)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="run"):
        trace(_model(), None)  # type: ignore[arg-type]
