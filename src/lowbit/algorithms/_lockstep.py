"""The float model run alongside the quantized one, paused at the same module: the reference
that AdaRound (per layer) and BRECQ (per block) reconstruct against.

The quantized model runs once over the joined calibration batch, and a pre-hook on each target
module does its work on the inputs it really receives (with every upstream correction already
made). The float model (a copy with every quantizer off) runs in a second thread whose pre-hooks
hand over the float inputs of the same module and wait until the main thread releases them.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lowbit.batches import Forward, run_batch
from lowbit.nn.quantizer import TensorQuantizer

__all__ = ["Lockstep", "float_copy"]

Call = tuple[tuple[Any, ...], dict[str, Any]]


def float_copy(qmodel: nn.Module) -> nn.Module:
    """The float model behind `qmodel`: a copy with every quantizer off (BN already folded)."""
    reference = copy.deepcopy(qmodel)
    for m in reference.modules():
        if isinstance(m, TensorQuantizer):
            m.set_mode("off")
    return reference.eval()


class Lockstep:
    """Runs `model` in a thread that pauses at each of `modules`' first call, so the quantized
    model's hook can read the float inputs of the same module (`take`), then lets it go on
    (`release`)."""

    _END = "__end__"

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        batch: Any,
        forward: Forward | None,
        algorithm: str,
    ) -> None:
        self.algorithm = algorithm
        self.calls: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.resume = threading.Semaphore(0)
        self.stopped = False
        seen: set[str] = set()

        def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if name in seen or self.stopped:
                    return
                seen.add(name)
                self.calls.put((name, (args, kwargs)))
                self.resume.acquire()

            return hook

        self.handles = [
            m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in modules.items()
        ]

        def run() -> None:
            try:
                with torch.no_grad():
                    run_batch(model, batch, forward)
                self.calls.put((self._END, None))
            except BaseException as error:  # handed to the main thread
                self.calls.put((self._END, error))

        self.thread = threading.Thread(target=run, daemon=True)

    def __enter__(self) -> Lockstep:
        self.thread.start()
        return self

    def take(self, name: str) -> Call:
        """The float model's (args, kwargs) at module `name`; the float thread waits meanwhile."""
        got, value = self.calls.get()
        if got != name:
            if isinstance(value, BaseException):
                raise RuntimeError(f"the float reference failed: {value}") from value
            raise RuntimeError(
                f"{self.algorithm}: the float model reached {got!r} where the quantized model ran "
                f"{name!r}; their modules must run in the same order"
            )
        args, kwargs = value
        return args, kwargs

    def release(self) -> None:
        self.resume.release()

    def __exit__(self, *exc: object) -> None:
        self.stopped = True
        for h in self.handles:
            h.remove()
        for _ in range(len(self.handles) + 1):
            self.resume.release()
        self.thread.join(timeout=60)
