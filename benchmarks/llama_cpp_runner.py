"""llama.cpp itself, through its C API: the bindings of `llama-cpp-python` (ctypes; the pip
package builds llama.cpp from source, natively for the CPU it is built on) or, where its prebuilt
libraries load (glibc 2.38 or newer), `llama-cpp-py-sync` (CFFI; a wheel, no compiler).

The benchmarks feed llama.cpp token ids, never text, so that it sees exactly the tokens PyTorch
sees: `logits(ids)` gives the logits of every position of one sequence (one `llama_decode` per
`n_batch` tokens, every position an output), `greedy(prompt, n)` times greedy decoding with the
KV cache, token by token. The context is made here, not by the package's `Llama` class, so that
nothing else (a sampler, embeddings kept for every token) runs.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np


class _Bindings:
    """The C functions (`lib`) and how to read a float array at a pointer, for either package."""

    def __init__(self) -> None:
        if importlib.util.find_spec("llama_cpp") is not None:
            import llama_cpp

            self.lib: Any = llama_cpp.llama_cpp
            self.package = f"llama-cpp-python {llama_cpp.__version__}"
            self.floats = lambda ptr, n: np.ctypeslib.as_array(ptr, shape=(n,))
            self.text = lambda ptr: ptr.decode()
        else:
            from llama_cpp_py_sync import __llama_cpp_commit__, __version__
            from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

            ffi = get_ffi()
            self.lib = get_lib()
            self.package = f"llama-cpp-py-sync {__version__} ({__llama_cpp_commit__[:10]})"
            self.floats = lambda ptr, n: np.frombuffer(ffi.buffer(ptr, 4 * n), dtype=np.float32)
            self.text = lambda ptr: ffi.string(ptr).decode()


_BINDINGS: list[_Bindings] = []


def _bindings() -> _Bindings:
    if not _BINDINGS:
        _BINDINGS.append(_Bindings())
    return _BINDINGS[0]


def have_llama_cpp() -> bool:
    return any(importlib.util.find_spec(m) for m in ("llama_cpp", "llama_cpp_py_sync"))


def system_info() -> str:
    """The package and llama.cpp's own line (the CPU features its kernels were built with)."""
    b = _bindings()
    return f"{b.package}: {b.text(b.lib.llama_print_system_info()).strip()}"


class LlamaCpp:
    """One GGUF model and one context of `n_ctx` tokens, computed with `threads` threads."""

    def __init__(
        self, path: Path, threads: int, n_ctx: int, n_batch: int = 512, repack: bool = False
    ) -> None:
        self.b = _bindings()
        self.lib = self.b.lib
        self.lib.llama_backend_init()
        mparams = self.lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        # repack: llama.cpp's AMX / interleaved weight layouts ("extra buffers"). Off by default:
        # on the VM this was written on, its AMX path died of SIGILL / SIGSEGV in llama_decode.
        mparams.use_extra_bufts = repack
        self.model = self.lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = self.lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = self.n_batch = min(n_batch, n_ctx)
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.embeddings = False
        self.ctx = self.lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not make a context")
        self.vocab = int(self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(self.model)))
        self.n_past = 0

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def reset(self) -> None:
        """Forget every token (the KV cache is cleared)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def _decode(self, ids: list[int], all_logits: bool) -> None:
        batch = self.lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, token in enumerate(ids):
                batch.token[i] = token
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_logits or i == len(ids) - 1 else 0
            code = self.lib.llama_decode(self.ctx, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode failed with code {code}")
        finally:
            self.lib.llama_batch_free(batch)
        self.n_past += len(ids)

    def _row(self, i: int) -> np.ndarray[Any, Any]:
        return self.b.floats(self.lib.llama_get_logits_ith(self.ctx, i), self.vocab)

    def logits(self, ids: list[int]) -> np.ndarray[Any, Any]:
        """[len(ids), vocab] float32: the logits after each token of `ids`, from an empty cache."""
        self.reset()
        rows = []
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            self._decode(chunk, all_logits=True)
            rows += [self._row(i).copy() for i in range(len(chunk))]
        return np.stack(rows)

    def greedy(self, prompt: list[int], n: int) -> float:
        """Seconds per token of `n` greedy tokens after `prompt` (the prompt is not timed)."""
        self.reset()
        self._decode(prompt, all_logits=False)
        token = int(np.argmax(self._row(-1)))
        start = time.perf_counter()
        for _ in range(n):
            self._decode([token], all_logits=False)
            token = int(np.argmax(self._row(-1)))
        return (time.perf_counter() - start) / n
