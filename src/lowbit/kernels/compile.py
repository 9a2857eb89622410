"""When lowbit compiles its kernels, and the fallback when that fails.

Two kinds, both needing a C++ compiler: small fused kernels through `torch.compile` (inductor's
C++ backend), and lowbit's own C++ kernels (`kernels.native`). Both are on by default on CPU and
off when the environment sets `LOWBIT_COMPILE=0` or after `set_compile(False)`; either also stops
for good after it fails (one warning; the eager kernels compute the same codes).

A function lowbit `torch.compile`s is compiled once with dynamic shapes (`dynamic=True`): the
first call pays the compile (seconds to tens of seconds, cached on disk by inductor afterwards),
later shapes reuse it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from lowbit.exceptions import LowbitWarning

_state: dict[str, bool] = {"enabled": os.environ.get("LOWBIT_COMPILE", "1") != "0", "broken": False}


def set_compile(enabled: bool) -> None:
    """Use (True) or stop using (False) lowbit's compiled kernels (torch.compile and C++)."""
    _state["enabled"] = bool(enabled)


def switched_on() -> bool:
    """True unless compiling is switched off (`set_compile(False)`, `LOWBIT_COMPILE=0`)."""
    return _state["enabled"]


def compile_enabled() -> bool:
    """True when `torch.compile`d kernels will be tried (switched on, and none has failed)."""
    return _state["enabled"] and not _state["broken"]


class Compiled:
    """`fn` compiled on first use (dynamic shapes unless dynamic=False: then one compile per
    shape, up to dynamo's recompile limit, past which dynamo runs `fn` eagerly); `fn` itself when
    compiling is off or fails.

    Inside a graph that the user is compiling, the eager `fn` is returned so dynamo traces it.
    """

    def __init__(self, fn: Callable[..., Any], *, dynamic: bool = True) -> None:
        self.fn = fn
        self.dynamic = dynamic
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if not compile_enabled() or torch.compiler.is_compiling():
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=self.dynamic)
        try:
            return self._compiled(*args)
        except Exception as error:  # inductor missing a compiler, an unsupported op...
            _state["broken"] = True
            warnings.warn(
                f"lowbit: torch.compile of {self.fn.__name__} failed ({type(error).__name__}: "
                f"{str(error)[:200]}); using the eager kernels (set LOWBIT_COMPILE=0 to skip)",
                LowbitWarning,
                stacklevel=3,
            )
            return self.fn(*args)
