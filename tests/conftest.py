"""Shared fixtures: the digits CNN trained once per session (a few seconds)."""

from __future__ import annotations

import os

import pytest
import torch
import torch._inductor.config

from lowbit.cli import demo
from lowbit.kernels.compile import set_compile

# torch.compile costs tens of seconds per kernel on a cold cache; the tests of the compiled
# kernels switch it on themselves (tests/test_kernels.py), everything else runs the eager ones.
set_compile(False)

# Simulating an AVX2 CPU on a wider one (docs/kernels.md): ATEN_CPU_CAPABILITY sets the ISA inductor
# compiles for, but not the vector width it writes code for (still the host's 512 bits), and that
# mismatch reads past vectors. A real AVX2 CPU has both at 256.
if os.environ.get("ATEN_CPU_CAPABILITY", "").startswith("avx2"):
    torch._inductor.config.cpp.simdlen = 256


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
