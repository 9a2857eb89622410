"""Progress bars for long loops (calibration, evaluation), quiet when disabled or not a TTY."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_bar(items: Iterable[T], description: str, *, enabled: bool = True) -> Iterator[T]:
    """Iterate over `items`, showing a rich progress bar (with a total when `len` is known)."""
    if not enabled:
        yield from items
        return
    from rich.progress import track

    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    yield from track(items, description=description, total=total, transient=True)
