"""The architectures the streaming quantizer knows, and the model skeleton it runs them in.

The skeleton is the transformers model itself, built from `config.json` on the meta device (no
memory): lowbit does not reimplement attention or masks. Only the modules before the first block
(the embeddings, and the rotary embedding whose buffers are computed from the config) are made
real; each block is made real when its turn comes (`load_block`) and dropped after (`drop_block`).
The calibration tokens run through the real model up to the first block, where a hook keeps what
the block receives (hidden states, masks, position embeddings) as transformers computed them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.pretrained.checkpoint import Checkpoint

__all__ = [
    "BlockInput",
    "Family",
    "Skeleton",
    "block_made_real",
    "blocks_path",
    "build_meta",
    "make_real",
    "name_map",
    "supported_architectures",
    "tied_parameters",
]


@dataclass(frozen=True)
class Family:
    """A group of architectures sharing one block layout.

    bases: candidate paths of the base model (the first that holds `blocks` is used).
    blocks: path of the ModuleList of blocks in the base model.
    front: paths, in the base model, of what runs before the first block.
    scale_groups: (producer, consumers) inside a block, relative to it: the consumers read the
        producer's output channels one to one, so AWQ and SmoothQuant factors fold into it.
    call: keyword arguments of the model's forward for the calibration pass.
    """

    name: str
    architectures: tuple[str, ...]
    bases: tuple[str, ...]
    blocks: str
    front: tuple[str, ...]
    scale_groups: Callable[[Any], tuple[tuple[str, tuple[str, ...]], ...]]
    call: dict[str, Any] = field(default_factory=dict)


def _llama_groups(config: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    groups: list[tuple[str, tuple[str, ...]]] = [
        ("input_layernorm", attn),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ]
    heads = config.num_attention_heads
    if getattr(config, "num_key_value_heads", heads) == heads:  # no grouped-query sharing
        groups.insert(1, ("self_attn.v_proj", ("self_attn.o_proj",)))
    return tuple(groups)


def _bert_groups(_config: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    # Post-LN: every LayerNorm output also feeds a residual and GELU sits inside the MLP, so
    # only the value projection can absorb factors (for the attention output projection).
    return (("attention.self.value", ("attention.output.dense",)),)


FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        (
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "LlamaModel",
            "MistralModel",
            "Qwen2Model",
        ),
        ("model", ""),
        "layers",
        ("embed_tokens", "rotary_emb"),
        _llama_groups,
        {"use_cache": False},
    ),
    Family("bert", ("BertModel",), ("", "bert"), "encoder.layer", ("embeddings",), _bert_groups),
)


def supported_architectures() -> list[str]:
    """Every architecture name (config.json "architectures") `quantize_pretrained` accepts."""
    return [a for f in FAMILIES for a in f.architectures]


def family_of(config: dict[str, Any], where: object) -> tuple[Family, str]:
    """The family and architecture name of a config.json's contents (read from `where`);
    ValueError naming what is supported."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else f"model_type {config.get('model_type')!r}"
    for fam in FAMILIES:
        if arch in fam.architectures:
            return fam, arch
    raise ValueError(
        f"unsupported architecture {arch} in {where}: lowbit quantizes "
        f"{', '.join(supported_architectures())} block by block"
    )


def build_meta(folder: Path, config_dict: dict[str, Any]) -> tuple[Any, Family, str, nn.Module]:
    """(transformers config, family, architecture, the model on the meta device) of a folder
    whose config.json holds `config_dict`."""
    import transformers

    family, arch = family_of(config_dict, folder / "config.json")
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model: nn.Module = getattr(transformers, arch)(config)
    return config, family, arch, model.eval()


def blocks_path(model: nn.Module, family: Family) -> str:
    """Path of the ModuleList of blocks in `model` (the first base that holds it)."""
    base = next((b for b in family.bases if _has(model, _join(b, family.blocks))), family.bases[0])
    return _join(base, family.blocks)


def make_real(model: nn.Module, path: str, config: Any) -> nn.Module:
    """The module at `path` on the CPU, uninitialized (to be loaded) or, where it holds buffers
    that are not stored (a rotary embedding's), rebuilt from the config, which computes them."""
    module = model.get_submodule(path)
    if any(True for _ in _non_persistent(module)):
        module = type(module)(config=config)
        model.set_submodule(path, module)
    else:
        module.to_empty(device="cpu")
    return module


def block_made_real(blocks: nn.ModuleList, index: int) -> nn.Module:
    """Block `index` on the CPU, uninitialized; ValueError if it holds buffers that are not
    stored (transformers versions that keep a rotary embedding in every block)."""
    block = blocks[index]
    buffers = [n for n, _ in _non_persistent(block)]
    if buffers:
        raise ValueError(
            f"block {index} holds buffers not stored in the checkpoint ({', '.join(buffers)}): "
            "this transformers version is too old for lowbit's streaming quantizer; upgrade it"
        )
    return block.to_empty(device="cpu")


class _StopForward(Exception):
    """Raised from the first block's hook: the calibration pass ends there."""


@dataclass
class BlockInput:
    """What one block receives for one calibration batch."""

    hidden: Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self, block: nn.Module, hidden: Tensor | None = None) -> Tensor:
        """The block's output hidden states (the first output, whatever transformers returns)."""
        out = block(self.hidden if hidden is None else hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple | list) else out


class Skeleton:
    """The model on the meta device with the checkpoint's tensor names mapped onto it."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.config, self.family, self.architecture, self.model = build_meta(
            ckpt.folder, ckpt.config_dict
        )
        self.blocks_path = blocks_path(self.model, self.family)
        self.base = self.blocks_path.removesuffix(self.family.blocks).removesuffix(".")
        blocks = self.model.get_submodule(self.blocks_path)
        assert isinstance(blocks, nn.ModuleList)
        self.blocks: nn.ModuleList = blocks
        self.names = name_map(self.model, ckpt.tensors, ckpt.folder)
        self.scale_groups = self.family.scale_groups(self.config)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_names(self, index: int) -> dict[str, str]:
        """Block-relative state-dict key -> checkpoint tensor name, for block `index`."""
        prefix = f"{self.blocks_path}.{index}."
        return {k[len(prefix) :]: v for k, v in self.names.items() if k.startswith(prefix)}

    def outer_names(self) -> list[str]:
        """Checkpoint tensors outside every block (embeddings, final norm, head, ...)."""
        inside = {v for k, v in self.names.items() if k.startswith(f"{self.blocks_path}.")}
        return [n for n in self.ckpt.tensors if n not in inside]

    def load_front(self) -> None:
        """Make the modules before the first block real, with the checkpoint's tensors."""
        for rel in self.family.front:
            path = _join(self.base, rel)
            _load_into(make_real(self.model, path, self.config), path, self.names, self.ckpt)
        self.model.eval()  # the rebuilt modules too: no dropout

    def load_block(self, index: int) -> nn.Module:
        """Block `index` made real (float32) with its tensors from the checkpoint."""
        block = block_made_real(self.blocks, index)
        _load_into(block, f"{self.blocks_path}.{index}", self.names, self.ckpt)
        return block

    def drop_block(self, index: int) -> None:
        """Free block `index` (the skeleton keeps an empty module in its place)."""
        self.blocks[index] = nn.Module()

    def block_inputs(self, batches: Sequence[Tensor]) -> list[BlockInput]:
        """What the first block receives for each batch of token ids."""
        captured: list[BlockInput] = []

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            captured.append(BlockInput(hidden.detach(), rest, dict(kwargs)))
            raise _StopForward

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for ids in batches:
                with torch.no_grad(), contextlib.suppress(_StopForward):
                    self.model(input_ids=ids, **self.family.call)
        finally:
            handle.remove()
        if len(captured) != len(batches):
            raise RuntimeError("the calibration pass did not reach the first block")
        return captured


def _join(base: str, path: str) -> str:
    return f"{base}.{path}" if base else path


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _non_persistent(module: nn.Module) -> list[tuple[str, Tensor]]:
    found = []
    for mod_name, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if name in mod._non_persistent_buffers_set:
                found.append((f"{mod_name}.{name}" if mod_name else name, buf))
    return found


def name_map(
    model: nn.Module, stored: Container[str], folder: Path, skip: str | None = None
) -> dict[str, str]:
    """Model state-dict key -> name among the `stored` tensors of `folder` (with or without the
    base model's prefix, as checkpoints differ), keys starting with `skip` left out; ValueError
    listing model tensors it lacks (tied weights, which transformers ties again on load, may be
    absent)."""
    base_prefix = getattr(model, "base_model_prefix", "")
    tied = tied_parameters(model)
    names: dict[str, str] = {}
    missing: list[str] = []
    for key in model.state_dict():
        if skip is not None and key.startswith(skip):
            continue
        candidates = [key]
        if base_prefix:
            candidates += [f"{base_prefix}.{key}", key.removeprefix(f"{base_prefix}.")]
        found = next((c for c in candidates if c in stored), None)
        if found is not None:
            names[key] = found
        elif key not in tied:
            missing.append(key)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(f"checkpoint {folder} lacks tensor(s) {shown}: it is incomplete")
    return names


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the earlier name it is the same parameter as (a tied output head)."""
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return tied


def _load_into(module: nn.Module, path: str, names: dict[str, str], ckpt: Checkpoint) -> None:
    prefix = f"{path}." if path else ""
    keys = list(module.state_dict())
    tensors = ckpt.read([names[prefix + k] for k in keys], torch.float32)
    module.load_state_dict({k: tensors[names[prefix + k]] for k in keys}, strict=True)
