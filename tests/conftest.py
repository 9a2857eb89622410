"""Shared fixtures: the digits CNN trained once per session (a few seconds)."""

from __future__ import annotations

import pytest
import torch

from lowbit.cli import demo
from lowbit.kernels.compile import set_compile

# torch.compile costs tens of seconds per kernel on a cold cache; the tests of the compiled
# kernels switch it on themselves (tests/test_kernels.py), everything else runs the eager ones.
set_compile(False)


@pytest.fixture(scope="session")
def digits() -> demo.Digits:
    return demo.load_digits()


@pytest.fixture(scope="session")
def digits_net(digits: demo.Digits) -> torch.nn.Module:
    torch.manual_seed(0)
    return demo.train(demo.DigitsNet(), digits)


@pytest.fixture(scope="session")
def digits_fp32(digits: demo.Digits, digits_net: torch.nn.Module) -> float:
    return demo.accuracy(digits_net, digits.x_test, digits.y_test)
