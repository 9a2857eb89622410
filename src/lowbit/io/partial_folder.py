"""The output folder a block-by-block writer fills: refused if it holds something else, resumed
if it is a partial output of the same run.

A marker file says the folder is partial (and with which settings) until the writer finishes,
so a crash leaves finished blocks that a rerun with the same settings continues from, and a
rerun with other settings cannot mix two runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lowbit._atomic import write_atomic

__all__ = ["LOADER_FILES", "PARTIAL_MARKER", "copy_loader_files", "open_partial"]

PARTIAL_MARKER = "lowbit-partial.json"  # present while the folder is being written
# files of a Hugging Face model folder that a loader needs beside the weights and config.json
LOADER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def open_partial(dst: Path, run: Mapping[str, Any], marker: Mapping[str, Any]) -> dict[str, Any]:
    """Make `dst` ready to write `run` (JSON data: the settings); returns `run` as JSON reads it
    back. `dst` must be absent, empty, or a partial output of the same run (it then resumes);
    `marker` is what else the marker file records (e.g. the format)."""
    normal = json.loads(json.dumps(dict(run)))
    if dst.exists() and not dst.is_dir():
        raise NotADirectoryError(f"dst_dir is a file: {dst}")
    path = dst / PARTIAL_MARKER
    if path.is_file():
        earlier = json.loads(path.read_text("utf-8")).get("run", {})
        if earlier != normal:
            raise ValueError(
                f"{dst} holds a partial output of another run ({earlier}); "
                "remove it or rerun with those settings"
            )
        return normal
    if dst.is_dir() and any(dst.iterdir()):
        raise FileExistsError(
            f"{dst} is not empty and is not a partial lowbit output: "
            "choose a new folder or empty it"
        )
    dst.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({**marker, "run": normal}, indent=1).encode())
    return normal


def copy_loader_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer and generation files `src` has into `dst`, each atomically."""
    for name in LOADER_FILES:
        if (src / name).is_file():
            write_atomic(dst / name, (src / name).read_bytes())
