"""The `lowbit` command: quantize, eval, compare, report, demo (see docs/cli.md).

Exit codes: 0 success, 2 bad usage or bad input (one-line reason, no traceback).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from lowbit.cli import compare_cmd, demo_cmd, diagnose_cmd, quantize_cmd
from lowbit.cli.args import warn


def _version() -> str:
    try:
        return version("lowbit")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each sets `run`, the function that carries it out."""
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lowbit {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    quantize_cmd.add_parsers(commands)
    compare_cmd.add_parsers(commands)
    demo_cmd.add_parser(commands)
    diagnose_cmd.add_parser(commands)
    return parser


# Other libraries' notes to the developers who call them (lowbit's), not to lowbit's users.
_DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@contextmanager
def _plain_warnings(verbose: bool) -> Iterator[None]:
    """Warnings as one line each, each distinct warning once (see docs/cli.md).

    lowbit's own (`LowbitWarning`) always show; other libraries' warnings are marked as theirs,
    and their deprecation notes show only with --verbose.
    """
    from lowbit.exceptions import LowbitWarning

    seen: set[tuple[type[Warning], str]] = set()

    def show(message: Any, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
        text = (str(message).splitlines() or [category.__name__])[0]
        if (category, text) in seen:
            return
        seen.add((category, text))
        if issubclass(category, LowbitWarning):
            warn(text)
        elif verbose or not issubclass(category, _DEVELOPER_WARNINGS):
            warn(f"{text} ({category.__name__} from a library lowbit uses)")

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every one reaches `show`, which keeps the first
        warnings.showwarning = show
        yield


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with `n` PyTorch threads, then restore the previous setting."""
    if n is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    """Run the `lowbit` command line on `argv`; the exit status (0, 2, or 130 interrupted)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc hands to torchrun
    for option in ("batch_size", "num_calib", "limit", "size", "threads", "nproc"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            print(f"lowbit: error: --{option.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    try:
        with _plain_warnings(args.verbose), _threads(getattr(args, "threads", None)):
            return int(args.run(args))
    except (ValueError, TypeError, OSError, NotImplementedError, ImportError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"lowbit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
