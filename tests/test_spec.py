"""lowbit.spec: the integer grid of each QuantSpec, its storage dtype, and validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec


@pytest.mark.parametrize(
    "spec, qmin, qmax, dtype",
    [
        (QuantSpec(), -128, 127, torch.int8),
        (QuantSpec(narrow_range=True), -127, 127, torch.int8),
        (QuantSpec(signed=False), 0, 255, torch.uint8),
        (QuantSpec(signed=False, symmetric=False), 0, 255, torch.uint8),
        (QuantSpec(symmetric=False), -128, 127, torch.int8),
        (QuantSpec(bits=4), -8, 7, torch.int8),
        (QuantSpec(bits=4, narrow_range=True), -7, 7, torch.int8),
        (QuantSpec(bits=4, signed=False), 0, 15, torch.uint8),
        (QuantSpec(bits=2), -2, 1, torch.int8),
        (QuantSpec(bits=9), -256, 255, torch.int16),
        (QuantSpec(bits=9, signed=False), 0, 511, torch.int16),
        (QuantSpec(bits=16), -32768, 32767, torch.int16),
        (QuantSpec(bits=16, narrow_range=True), -32767, 32767, torch.int16),
        (QuantSpec(bits=16, signed=False), 0, 65535, torch.int32),
        (QuantSpec(bits=1, scheme="binary"), -1, 1, torch.int8),
        (QuantSpec(bits=2, scheme="ternary"), -1, 1, torch.int8),
        (QuantSpec(bits=4, scheme="log2"), -7, 7, torch.int8),
        (QuantSpec(bits=4, signed=False, scheme="log2"), 0, 15, torch.uint8),
        (QuantSpec(bits=8, scheme="log2"), -127, 127, torch.int8),
        (QuantSpec(bits=8, signed=False, scheme="log2"), 0, 255, torch.uint8),
    ],
    ids=repr,
)
def test_grid_and_storage_dtype(spec, qmin, qmax, dtype):
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    assert spec.storage_dtype == dtype
    info = torch.iinfo(spec.storage_dtype)
    assert info.min <= spec.qmin and spec.qmax <= info.max


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("signed", [True, False])
def test_uniform_grid_has_2_pow_bits_codes(bits, signed):
    spec = QuantSpec(bits=bits, signed=signed)
    assert spec.qmax - spec.qmin + 1 == 2**bits
    if signed:
        narrow = spec.with_(narrow_range=True)
        assert narrow.qmin == -narrow.qmax


def test_log2_levels():
    assert QuantSpec(bits=4, scheme="log2").log2_levels == 7
    assert QuantSpec(bits=3, signed=False, scheme="log2").log2_levels == 7


def test_defaults():
    spec = QuantSpec()
    assert spec.bits == 8 and spec.signed and spec.symmetric and not spec.narrow_range
    assert spec.granularity == PerTensor()
    assert (spec.scale_type, spec.rounding, spec.scheme) == ("float", "nearest", "uniform")


def test_frozen_hashable_and_with_():
    spec = QuantSpec(bits=4, granularity=PerGroup(32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 8  # type: ignore[misc]
    assert hash(spec) == hash(QuantSpec(bits=4, granularity=PerGroup(32)))
    other = spec.with_(bits=8)
    assert other.bits == 8 and spec.bits == 4 and other.granularity == PerGroup(32)
    with pytest.raises(ValueError, match="bits must be 2 to 16"):
        spec.with_(bits=17)  # revalidated


def test_granularity_defaults():
    assert PerChannel().axis == 0
    assert PerGroup(64).axis == -1
    assert PerGroup(64, axis=0) != PerGroup(64, axis=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 0}, r"bits must be 2 to 16 for scheme 'uniform', got 0"),
        ({"bits": 1}, r"bits must be 2 to 16"),
        ({"bits": 17}, r"bits must be 2 to 16 for scheme 'uniform', got 17"),
        ({"bits": 3, "scheme": "binary"}, r"bits must be 1 for scheme 'binary'"),
        ({"bits": 8, "scheme": "binary"}, r"bits must be 1 for scheme 'binary'"),
        ({"bits": 3, "scheme": "ternary"}, r"bits must be 2 for scheme 'ternary'"),
        ({"bits": 1, "scheme": "log2"}, r"bits must be 2 to 8 for scheme 'log2'"),
        ({"bits": 9, "scheme": "log2"}, r"bits must be 2 to 8 for scheme 'log2'"),
        ({"bits": 8.0}, r"bits must be an int"),
        ({"bits": True}, r"bits must be an int"),
        ({"rounding": "floor"}, r"rounding must be one of"),
        ({"scheme": "fp8"}, r"scheme must be one of"),
        ({"scale_type": "pow10"}, r"scale_type must be one of"),
        ({"granularity": "per_tensor"}, r"granularity must be PerTensor"),
        ({"narrow_range": True, "signed": False}, r"narrow_range needs signed=True"),
        ({"narrow_range": True, "symmetric": False}, r"narrow_range needs signed=True"),
        ({"bits": 1, "scheme": "binary", "symmetric": False}, r"needs signed=True and symmetric"),
        ({"bits": 1, "scheme": "binary", "signed": False}, r"needs signed=True and symmetric"),
        ({"bits": 2, "scheme": "ternary", "symmetric": False}, r"'ternary' needs signed=True"),
        ({"bits": 4, "scheme": "log2", "symmetric": False}, r"'log2' needs symmetric=True"),
    ],
)
def test_invalid_specs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


@pytest.mark.parametrize("size", [0, -4, 2.5, "8"])
def test_pergroup_size_must_be_positive_int(size):
    with pytest.raises(ValueError, match=r"PerGroup\.size must be a positive int"):
        PerGroup(size)
