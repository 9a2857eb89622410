"""Progress output for long loops (calibration, evaluation, searches), always on stderr.

The library never writes to stdout: results are returned (and attached to models as
summaries); only progress, which a pipe or a `--json` reader must not see, goes to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")


def stderr_console() -> Console:
    """The console every progress bar draws on (rich's default would be stdout)."""
    from rich.console import Console

    return Console(stderr=True)


def progress_bar(items: Iterable[T], description: str, *, enabled: bool = True) -> Iterator[T]:
    """Iterate over `items`, showing a rich progress bar (with a total when `len` is known)."""
    if not enabled:
        yield from items
        return
    from rich.progress import track

    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    yield from track(
        items, description=description, total=total, transient=True, console=stderr_console()
    )


def progress_line(message: str, *, enabled: bool = True) -> None:
    """One line of progress for a step a bar cannot count (e.g. a search of unknown length)."""
    if enabled:
        print(message, file=sys.stderr, flush=True)
