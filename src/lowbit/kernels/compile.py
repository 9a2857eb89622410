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

    Inductor writes different code for each CPU and shape class, and lowbit's tests see only a
    few, so the compiled kernel is trusted once it has matched `fn`: the first call with each new
    signature (shapes, strides, dtypes and the other arguments) runs both and compares them (exact
    for integer results). On a mismatch lowbit warns once and keeps the eager `fn` for good.

    Inside a graph that the user is compiling, the eager `fn` is returned so dynamo traces it.
    """

    def __init__(self, fn: Callable[..., Any], *, dynamic: bool = True) -> None:
        self.fn = fn
        self.dynamic = dynamic
        self._compiled: Callable[..., Any] | None = None
        self._checked: set[tuple[Any, ...]] = set()
        self._wrong = False

    def __call__(self, *args: Any) -> Any:
        if self._wrong or not compile_enabled() or torch.compiler.is_compiling():
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=self.dynamic)
        try:
            out = self._compiled(*args)
        except Exception as error:  # inductor missing a compiler, an unsupported op...
            _state["broken"] = True
            warnings.warn(
                f"lowbit: torch.compile of {self.fn.__name__} failed ({type(error).__name__}: "
                f"{str(error)[:200]}); using the eager kernels (set LOWBIT_COMPILE=0 to skip)",
                LowbitWarning,
                stacklevel=3,
            )
            return self.fn(*args)
        key = tuple(_signature(a) for a in args)
        if key in self._checked:
            return out
        expected = self.fn(*args)
        if not _same(out, expected):
            self._wrong = True
            warnings.warn(
                f"lowbit: torch.compile's kernel for {self.fn.__name__} computed other values than "
                f"the eager one on this CPU (inductor ISA: {_inductor_isa()}); using the eager "
                "kernel",
                LowbitWarning,
                stacklevel=2,
            )
            return expected
        self._checked.add(key)
        return out


def _signature(arg: Any) -> Any:
    """What decides which compiled code runs for `arg`, hashable."""
    if isinstance(arg, torch.Tensor):
        return (tuple(arg.shape), arg.stride(), arg.dtype, arg.device)
    if isinstance(arg, (list, tuple)):
        return tuple(_signature(a) for a in arg)
    return arg


def _same(a: Any, b: Any) -> bool:
    """Equal results: exactly for integer tensors, to float rounding for float ones."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True))
        return bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _inductor_isa() -> str:
    """The vector ISA inductor generates code for here, for the warning."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa()) or "scalar"
    except Exception:  # a private API: the warning must not fail
        return "unknown"
