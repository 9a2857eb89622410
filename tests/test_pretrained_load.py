"""`lowbit.load_pretrained` (issue 17): one call gives back the model a format="lowbit" folder
holds, computing the logits of the quantization's simulation (in-memory GPTQ on the float model:
`tests/test_pretrained.py` checks that its codes equal the streamed ones); partial folders and
folders of other formats are refused with what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from test_pretrained import GROUP, _llama, _tokens  # noqa: E402

import lowbit  # noqa: E402
from lowbit.algorithms import gptq  # noqa: E402
from lowbit.nn.int_base import IntModule  # noqa: E402
from lowbit.pretrained import block as block_mod  # noqa: E402
from lowbit.pretrained.lowbit_writer import block_file  # noqa: E402


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block Llama whose output head is the embedding (the loader must tie it again)."""
    return _llama(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


def _simulated_logits(src: Path, batches: torch.Tensor) -> torch.Tensor:
    """Logits of lowbit's simulation of GPTQ W4 g32 on the float model, in memory."""
    model = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    spec = lowbit.QuantSpec(bits=4, granularity=lowbit.PerGroup(GROUP))
    cfg = lowbit.QuantConfig(overrides={nn.Linear: lowbit.LayerQuant(weight=spec), "lm_head": None})
    data = [row.unsqueeze(0) for row in batches]
    qmodel = gptq(lowbit.quantize(model, cfg, data, progress=False), data, progress=False)
    with torch.no_grad():
        return qmodel(batches).logits


def test_load_pretrained_gives_the_simulated_model(tied: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    batches = _tokens()
    dst = tmp_path / "lb"
    args: dict[str, Any] = dict(method="gptq", group_size=GROUP, calib=batches, progress=False)
    lowbit.quantize_pretrained(tied, dst, format="lowbit", **args)
    model = lowbit.load_pretrained(dst)
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    ints = [n for n, m in model.named_modules() if isinstance(m, IntModule)]
    assert len(ints) == 14 and all(n.startswith("model.layers.") for n in ints)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again
    assert not any(t.is_meta for t in model.state_dict().values())
    with torch.no_grad():
        got = model(batches).logits
    want = _simulated_logits(tied, batches)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    float_logits = transformers.LlamaForCausalLM.from_pretrained(tied).eval()(batches).logits
    assert not torch.allclose(got, float_logits, atol=1e-3)  # it is the quantized model


def test_load_pretrained_refuses_what_it_cannot_load(
    tied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    real = block_mod.quantize_block
    calls: list[int] = []

    def stop_at_second(*a: Any, **k: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("lowbit.pretrained.engine.quantize_block", stop_at_second)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize_pretrained(tied, part, group_size=GROUP, format="lowbit", progress=False)
    with pytest.raises(ValueError, match=r"partial output \(1 block\(s\) written.*rerun"):
        lowbit.load_pretrained(part)
    monkeypatch.setattr("lowbit.pretrained.engine.quantize_block", real)
    done = tmp_path / "done"
    lowbit.quantize_pretrained(tied, done, group_size=GROUP, format="lowbit", progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(done, broken)
    block_file(broken, 1).unlink()
    with pytest.raises(ValueError, match=r"lacks the block file\(s\) of block\(s\) \[1\]"):
        lowbit.load_pretrained(broken)
    for outer in broken.glob("outer-*.safetensors"):
        outer.unlink()
    shutil.copyfile(block_file(done, 1), block_file(broken, 1))
    with pytest.raises(ValueError, match="lacks tensor"):
        lowbit.load_pretrained(broken)
    with pytest.raises(ValueError, match="not an output of quantize_pretrained"):
        lowbit.load_pretrained(tied)  # the float source folder
    ct = tmp_path / "ct"
    (ct).mkdir()
    config = json.loads((tied / "config.json").read_text())
    config["quantization_config"] = {"format": "pack-quantized"}
    (ct / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="compressed-tensors output: transformers"):
        lowbit.load_pretrained(ct)
    with pytest.raises(ValueError, match="is not a folder"):
        lowbit.load_pretrained(tmp_path / "absent")
