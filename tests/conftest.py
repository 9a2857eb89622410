"""Shared fixtures: the digits CNN trained once per session (a few seconds)."""

from __future__ import annotations

import pytest
import torch

from lowbit import demo


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
