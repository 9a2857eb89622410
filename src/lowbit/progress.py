"""Progress output for long loops (calibration, evaluation, searches), on stderr by default.

The library never writes to stdout: results are returned (and attached to models as
summaries); only progress, which a pipe or a `--json` reader must not see, goes to stderr, or to
the text stream a caller passes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TextIO, TypeVar

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")


def stderr_console(stream: TextIO | None = None) -> Console:
    """The console a progress bar draws on: `stream`, or stderr (rich's default is stdout)."""
    from rich.console import Console

    return Console(stderr=True) if stream is None else Console(file=stream)


def progress_bar(
    items: Iterable[T], description: str, *, enabled: bool = True, stream: TextIO | None = None
) -> Iterator[T]:
    """Iterate over `items`, showing a rich progress bar (with a total when `len` is known) on
    `stream` (default stderr)."""
    if not enabled:
        yield from items
        return
    from rich.progress import track

    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    yield from track(
        items,
        description=description,
        total=total,
        transient=True,
        console=stderr_console(stream),
    )


def progress_line(message: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
    """One line of progress on `stream` (default stderr) for a step a bar cannot count (e.g. a
    search of unknown length)."""
    if enabled:
        out = sys.stderr if stream is None else stream
        out.write(message + "\n")
        out.flush()
