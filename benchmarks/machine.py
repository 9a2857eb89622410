"""What a benchmark ran on: the CPU (model name, the ISA flags that decide the integer kernels)
and the kernels lowbit picks on it. Every benchmark prints this line and stores it in its JSON,
since the same model runs other kernels, at another speed, on another CPU."""

from __future__ import annotations

import os
import platform
from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

from lowbit import kernels
from lowbit.nn import IntModule

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_vpopcntdq")


def cpu_description() -> str:
    """The CPU's model name and the integer-matmul ISA flags it has (Linux)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return platform.processor() or platform.machine()
    lines = info.read_text().splitlines()
    name = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
        platform.machine(),
    )
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    have = [f for f in ISA_FLAGS if f in flags]
    return f"{name} ({', '.join(have) or 'no AVX2 / VNNI / AMX'}; {os.cpu_count()} logical CPUs)"


def describe() -> dict[str, Any]:
    """The CPU and lowbit's kernel route on it, for a benchmark's JSON."""
    return {"cpu": cpu_description(), "kernels": kernels.cpu_route()}


def describe_line() -> str:
    """The same, as one line to print above a table."""
    route = ", ".join(f"{k} {v}" for k, v in kernels.cpu_route().items())
    return f"CPU: {cpu_description()}\nlowbit kernels here: {route}"


def kernels_used(model: nn.Module) -> dict[str, int]:
    """How many layers of a converted model run each kernel (`module.kernel`)."""
    return dict(Counter(m.kernel for m in model.modules() if isinstance(m, IntModule)))
