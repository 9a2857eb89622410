"""The kernel layouts an integer module derives from its buffers, and the one rule that keeps them
right.

A layout (an int8 copy of packed codes, fbgemm- or oneDNN-prepacked weights, weight row sums) is
built on first use and is valid while the tensors it comes from are the same objects, unchanged in
place. `.to()` / `.half()` replace a module's buffers and `load_state_dict` copies into them
(which bumps their version counter; `IntModule` also drops them there, for inference tensors,
which keep none): either way the layouts are dropped at the next use. A copy or
a pickle of the module starts with none (oneDNN's packed tensors cannot be copied), and the state
dict never holds them: files keep the portable codes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")
# Per source: something that returns it while it lives (a weak reference), and its version
# counter (None where it has none: an absent source, an inference tensor).
_Stamp = tuple[tuple[Callable[[], "Tensor | None"], "int | None"], ...]


def _none() -> None:
    return None


class Packs:
    """A module's kernel layouts by name, valid for one state of their source tensors."""

    def __init__(self) -> None:
        self._entries: dict[str, Any] = {}
        self._stamp: _Stamp = ()

    def of(self, sources: Sequence[Tensor | None]) -> dict[str, Any]:
        """The layouts, emptied first if any of `sources` was replaced or changed in place.

        While dynamo traces a graph only replacement is checked (a version counter read there
        breaks the graph) and the stamp is not stored (a weak reference stored there comes back a
        strong one): a compiled model sees a `load_state_dict` into it at its next eager call.
        """
        # Runs on every forward of a converted layer: a plain loop.
        compiling = torch.compiler.is_compiling()
        if compiling and self._entries:
            # Layouts built eagerly hold opaque tensors (oneDNN's packed weights) that dynamo
            # would bake into the graph as plain constants and read out of bounds: trace the
            # packing instead.
            return {}
        stamp = self._stamp
        fresh = len(stamp) == len(sources)
        if fresh:
            for (ref, version), t in zip(stamp, sources, strict=True):
                if ref() is not t or (
                    version is not None and not compiling and t._version != version  # type: ignore[union-attr]
                ):
                    fresh = False
                    break
        if not fresh:
            self._entries = {}
            if not compiling:
                self._stamp = tuple(_stamp(t) for t in sources)
        return self._entries

    def __reduce__(self) -> tuple[type[Packs], tuple[()]]:
        """Copied and pickled empty: the layouts are rebuilt from the copied buffers."""
        return Packs, ()


def cached(entries: dict[str, Any], name: str, make: Callable[[], T]) -> T:
    """`entries[name]`, made first if missing."""
    if name not in entries:
        entries[name] = make()
    return entries[name]


def _stamp(t: Tensor | None) -> tuple[Callable[[], Tensor | None], int | None]:
    if t is None:
        return _none, None
    # Inference tensors keep no version counter: for them only replacement is seen.
    return weakref.ref(t), None if t.is_inference() else t._version
