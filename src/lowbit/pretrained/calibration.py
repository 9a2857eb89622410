"""Calibration data for the streaming quantizer: texts or token ids, cut into windows."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["calibration_batches", "fingerprint"]


def calibration_batches(
    calib: Any,
    src_dir: Path,
    *,
    seq_len: int,
    num_samples: int | None,
    vocab_size: int,
) -> list[Tensor]:
    """Batches of token ids ([1, seq_len] each, or the user's own [batch, tokens]).

    `calib`: a text, a list of texts (joined with blank lines, tokenized with the tokenizer of
    `src_dir`, cut into windows of `seq_len` tokens, the tail dropped), a 2-D tensor of token ids
    (one batch per row), or a list of 1-D / 2-D tensors or lists of ints (one batch each).
    At most `num_samples` batches. ValueError for an empty set, text shorter than one window,
    or ids outside the vocabulary.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}")
    if isinstance(calib, str) or (
        isinstance(calib, Sequence) and calib and all(isinstance(t, str) for t in calib)
    ):
        batches = _windows(_tokenize(calib, src_dir), seq_len)
    elif isinstance(calib, Tensor):
        batches = [row.unsqueeze(0) for row in _ids(calib, "calib").reshape(-1, calib.shape[-1])]
    elif isinstance(calib, Sequence) and calib:
        batches = [_ids(b, f"calib[{i}]") for i, b in enumerate(calib)]
        batches = [b.unsqueeze(0) if b.dim() == 1 else b for b in batches]
    else:
        raise ValueError(
            "calib: pass calibration texts (a list of str) or token ids (a 2-D tensor or a list "
            f"of 1-D tensors); got {type(calib).__name__}"
            + (" (empty)" if isinstance(calib, Sequence) else "")
        )
    for i, b in enumerate(batches):
        if b.dim() != 2 or b.shape[1] == 0:
            raise ValueError(f"calib batch {i}: expected [batch, tokens] ids, got {tuple(b.shape)}")
        if int(b.min()) < 0 or int(b.max()) >= vocab_size:
            raise ValueError(f"calib batch {i}: token ids must lie in [0, {vocab_size})")
    return batches[:num_samples] if num_samples else batches


def _ids(obj: Any, where: str) -> Tensor:
    t = obj if isinstance(obj, Tensor) else torch.as_tensor(obj)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() not in (1, 2):
        raise ValueError(
            f"{where}: expected integer token ids (1-D or 2-D), got {t.dtype} {tuple(t.shape)}"
        )
    return t.to(torch.long)


def _tokenize(texts: str | Sequence[str], src_dir: Path) -> Tensor:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"calib is text but {src_dir} has no usable tokenizer ({error}); pass token ids"
        ) from None
    joined = texts if isinstance(texts, str) else "\n\n".join(texts)
    return torch.tensor(tokenizer(joined, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _windows(ids: Tensor, seq_len: int) -> list[Tensor]:
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(
            f"the calibration text is {ids.numel()} tokens long, shorter than one window of "
            f"seq_len={seq_len} tokens: pass more text or a smaller seq_len"
        )
    return [ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0) for i in range(n)]


def fingerprint(batches: Sequence[Tensor]) -> str:
    """A short hash of the token ids: a resumed run checks it calibrates on the same data."""
    h = hashlib.sha256()
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.numpy().tobytes())
    return h.hexdigest()[:16]
