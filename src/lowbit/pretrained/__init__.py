"""Quantize Hugging Face checkpoints larger than memory, block by block (`quantize_pretrained`).

See docs/pretrained.md. Layer: above `io` and `export` (it writes their files), below `evaluate`.
"""

from lowbit.pretrained.architectures import supported_architectures
from lowbit.pretrained.block import METHODS
from lowbit.pretrained.engine import FORMATS, quantize_pretrained
from lowbit.pretrained.loader import load_pretrained

__all__ = [
    "FORMATS",
    "METHODS",
    "load_pretrained",
    "quantize_pretrained",
    "supported_architectures",
]
