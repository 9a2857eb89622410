"""lowbit.quantize_pretrained: Hugging Face folders quantized block by block (issue 17).

The streamed result must equal lowbit's in-memory quantization of the same model, code for code
(round to nearest and GPTQ, whose every layer sees inputs already carrying the quantization of
the layers before it); an interrupted run resumes to the same files; bad input fails before
anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit import numerics  # noqa: E402
from lowbit.algorithms import gptq  # noqa: E402
from lowbit.io.partial_folder import PARTIAL_MARKER as PARTIAL  # noqa: E402
from lowbit.nn.int_base import IntModule  # noqa: E402
from lowbit.nn.modules import quant_modules  # noqa: E402
from lowbit.pretrained import block as block_mod  # noqa: E402
from lowbit.pretrained.lowbit_writer import MANIFEST, block_file  # noqa: E402

GROUP = 32


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama(folder: Path, **changes: Any) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **changes,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="60KB")
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert")
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def _tokens(n: int = 3, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(1))


def _streamed_codes(dst: Path, src: Path, blocks: str) -> dict[str, torch.Tensor]:
    """Integer codes of every block file, by full module name, loaded with lowbit.load."""
    config = transformers.AutoConfig.from_pretrained(src)
    arch = getattr(transformers, config.architectures[0])
    model = arch(config)
    codes = {}
    for i, block in enumerate(model.get_submodule(blocks)):
        loaded = lowbit.load(block_file(dst, i), block)
        for name, m in loaded.named_modules():
            if isinstance(m, IntModule):
                codes[f"{blocks}.{i}.{name}"] = m.weight_codes()
    return codes


def _in_memory_codes(
    src: Path, batches: torch.Tensor, method: str, **gptq_args: Any
) -> dict[str, torch.Tensor]:
    config = transformers.AutoConfig.from_pretrained(src)
    model = getattr(transformers, config.architectures[0]).from_pretrained(src).eval()
    spec = lowbit.QuantSpec(bits=4, granularity=lowbit.PerGroup(GROUP))
    names = dict(model.named_modules())
    keep = {n: None for n in ("lm_head", "pooler.dense") if n in names}  # float, as streamed
    cfg = lowbit.QuantConfig(overrides={nn.Linear: lowbit.LayerQuant(weight=spec), **keep})
    data = [row.unsqueeze(0) for row in batches]
    qmodel = lowbit.quantize(model, cfg, data, progress=False)
    if method == "gptq":
        gptq(qmodel, data, progress=False, **gptq_args)
    out = {}
    for name, qm in quant_modules(qmodel).items():
        wq = qm.weight_quantizer
        assert wq is not None
        out[name] = numerics.quantize(qm.module.weight, wq.scale, wq.zero_point, wq.spec)
    return out


@pytest.mark.parametrize(("method", "act_order"), [("rtn", False), ("gptq", False), ("gptq", True)])
def test_llama_stream_equals_in_memory(
    llama: Path, tmp_path: Path, method: str, act_order: bool
) -> None:
    batches = _tokens()
    dst = tmp_path / "out"
    lowbit.quantize_pretrained(
        llama,
        dst,
        method=method,
        group_size=GROUP,
        calib=batches,
        format="lowbit",
        act_order=act_order,
        progress=False,
    )
    assert not (dst / PARTIAL).exists() and (dst / MANIFEST).is_file()
    streamed = _streamed_codes(dst, llama, "model.layers")
    reference = _in_memory_codes(llama, batches, method, act_order=act_order)
    assert sorted(streamed) == sorted(reference) and len(streamed) == 14
    for name, codes in reference.items():
        assert torch.equal(streamed[name].to(torch.int32), codes.to(torch.int32)), name


def test_bert_gptq_stream_equals_in_memory(bert: Path, tmp_path: Path) -> None:
    batches = _tokens()
    lowbit.quantize_pretrained(
        bert,
        tmp_path / "out",
        method="gptq",
        group_size=GROUP,
        calib=batches,
        format="lowbit",
        progress=False,
    )
    streamed = _streamed_codes(tmp_path / "out", bert, "encoder.layer")
    reference = _in_memory_codes(bert, batches, "gptq")
    assert sorted(streamed) == sorted(reference) and len(streamed) == 12
    for name, codes in reference.items():
        assert torch.equal(streamed[name].to(torch.int32), codes.to(torch.int32)), name


def _files(dst: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(dst)): p.read_bytes()
        for p in sorted(dst.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def test_interrupted_run_resumes_to_the_same_output(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args: dict[str, Any] = dict(
        method="gptq", group_size=GROUP, calib=_tokens(), format="lowbit", progress=False
    )
    lowbit.quantize_pretrained(llama, tmp_path / "whole", **args)
    real = block_mod.quantize_block
    calls = []

    def stop_at_second(*a: Any, **k: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("lowbit.pretrained.engine.quantize_block", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize_pretrained(llama, tmp_path / "part", **args)
    part = tmp_path / "part"
    assert (part / PARTIAL).is_file() and block_file(part, 0).is_file()
    assert not block_file(part, 1).exists() and not (part / MANIFEST).exists()
    with pytest.raises(ValueError, match="partial output of another run"):
        lowbit.quantize_pretrained(llama, part, **{**args, "method": "rtn"})
    monkeypatch.setattr("lowbit.pretrained.engine.quantize_block", real)
    resumed = []
    monkeypatch.setattr(
        "lowbit.pretrained.engine.quantize_block",
        lambda *a, **k: resumed.append(1) or real(*a, **k),
    )
    lowbit.quantize_pretrained(llama, part, **args)
    assert len(resumed) == 1  # only the block that was missing
    assert _files(part) == _files(tmp_path / "whole")


def test_awq_and_smoothquant_keep_the_model_close(llama: Path, tmp_path: Path) -> None:
    """AWQ and SmoothQuant fold their factors into the RMSNorms and keep the function: W8A8
    after smoothing is far closer to the float model than W4 round to nearest."""
    batches = _tokens()
    model = transformers.LlamaForCausalLM.from_pretrained(llama).eval()
    with torch.no_grad():
        ref = model(batches).logits
    errors, folded = {}, {}
    for method, bits, group in (("rtn", 4, GROUP), ("awq", 4, GROUP), ("smoothquant", 8, None)):
        dst = tmp_path / method
        lowbit.quantize_pretrained(
            llama,
            dst,
            method=method,
            bits=bits,
            group_size=group,
            calib=batches,
            format="lowbit",
            progress=False,
        )
        got = transformers.LlamaForCausalLM.from_pretrained(llama).eval()
        for i in range(2):
            lowbit.load(block_file(dst, i), got.model.layers[i])
        with torch.no_grad():
            errors[method] = float((got(batches).logits - ref).pow(2).mean() / ref.pow(2).mean())
        folded[method] = not torch.equal(
            got.model.layers[0].post_attention_layernorm.weight,
            model.model.layers[0].post_attention_layernorm.weight,
        )
    # random weights have no salient channels: AWQ scales some (its factors went into the
    # RMSNorms) and ends near round to nearest, where a wrong fold would be far off
    assert folded == {"rtn": False, "awq": True, "smoothquant": True}
    assert errors["awq"] < 1.2 * errors["rtn"]
    assert errors["smoothquant"] < 0.1 * errors["rtn"]


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", *[f"w{i}" for i in range(100)]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(folder)


def test_bad_input_writes_nothing(llama: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"

    def run(src: Path, **k: Any) -> None:
        lowbit.quantize_pretrained(src, dst, group_size=GROUP, format="lowbit", progress=False, **k)

    with pytest.raises(ValueError, match=r"no config\.json"):
        run(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in llama.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    shards = sorted(broken.glob("model-*.safetensors"))
    assert len(shards) > 1
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        run(broken)
    shards[-1].unlink()
    with pytest.raises(ValueError, match="missing shard"):
        run(broken)
    shards[-1].write_bytes(data)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*BertModel"):
        run(broken)
    (broken / "config.json").write_text(json.dumps(config))
    _write_tokenizer(broken)
    with pytest.raises(ValueError, match="shorter than one window"):
        run(broken, method="gptq", calib=["w1 w2 w3"], seq_len=16)
    with pytest.raises(ValueError, match="needs calibration data"):
        run(broken, method="gptq")
    with pytest.raises(ValueError, match="act_order must be True or False"):
        run(broken, method="gptq", calib=_tokens(), act_order="yes")
    assert not dst.exists()
    # text calibration works once there is enough of it
    run(broken, method="gptq", calib=[" ".join(f"w{i % 100}" for i in range(40))], seq_len=16)
    assert (dst / MANIFEST).is_file()


def _simulated(src: Path, dst: Path) -> nn.Module:
    model = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    for i, layer in enumerate(model.model.layers):
        lowbit.load(block_file(dst, i), layer)
    return model


def test_compressed_tensors_output_loads_in_transformers(llama: Path, tmp_path: Path) -> None:
    """The default format: `from_pretrained(dst)` just works and computes lowbit's numbers."""
    pytest.importorskip("compressed_tensors")
    batches = _tokens()
    args: dict[str, Any] = dict(method="gptq", group_size=GROUP, calib=batches, progress=False)
    lowbit.quantize_pretrained(llama, tmp_path / "ct", **args)
    lowbit.quantize_pretrained(llama, tmp_path / "lb", format="lowbit", **args)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    with torch.no_grad():
        got = loaded(batches).logits
        want = _simulated(llama, tmp_path / "lb")(batches).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_gguf_needs_what_it_can_hold(llama: Path, tmp_path: Path) -> None:
    """GGUF's Q4_0 / Q8_0 hold groups of 32 with float16 scales, and need a tokenizer: other
    requests fail before anything is written (h17f's tests check the GGUF writer itself)."""
    with pytest.raises(ValueError, match="Q4_0 / Q8_0"):
        lowbit.quantize_pretrained(llama, tmp_path / "g", method="gptq", format="gguf")
    with pytest.raises(ValueError, match="Q4_0 / Q8_0"):
        lowbit.quantize_pretrained(llama, tmp_path / "g", group_size=64, format="gguf")
    with pytest.raises(ValueError, match="tokenizer"):
        lowbit.quantize_pretrained(llama, tmp_path / "g", group_size=32, format="gguf")
    assert not (tmp_path / "g").exists()


def test_cli_quantizes_a_folder(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lowbit.cli import main

    out = tmp_path / "out"
    argv = ["quantize", str(llama), "--group-size", "32", "--format", "lowbit", "-o", str(out)]
    assert main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["method"] == "rtn" and record["num_blocks"] == 2
    assert (out / MANIFEST).is_file() and not (out / PARTIAL).exists()
    assert main(["quantize", str(llama), "--method", "gptq", "-o", str(tmp_path / "g")]) == 2
    assert "needs calibration text" in capsys.readouterr().err
