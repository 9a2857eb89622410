"""The `lowbit` command line: the parser, one module per command family, model and data loaders."""

from lowbit.cli.main import main

__all__ = ["main"]
