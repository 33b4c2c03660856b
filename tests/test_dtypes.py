"""mergekit_fast.dtypes (dtypes without torch) against torch's own dtypes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mergekit_fast import dtypes

ALL = list(dtypes.BY_NAME.values())


@pytest.mark.parametrize("d", ALL, ids=str)
def test_matches_torch(d):
    t = d.torch
    assert d == t and t == d and not (d != t)
    assert d.itemsize == torch.empty((), dtype=t).element_size()
    assert d.is_float == t.is_floating_point
    assert dtypes.of(t) is d and dtypes.of(d.name) is d and dtypes.of(d.code) is d and dtypes.of(str(t)) is d
    assert str(d) == str(t)


def test_unequal_and_unknown():
    assert dtypes.bfloat16 != torch.float16 and torch.float32 != dtypes.float64
    assert dtypes.bfloat16 != "bfloat16"  # only dtypes compare equal
    with pytest.raises(ValueError, match="unknown dtype 'float128'"):
        dtypes.of("float128")
    with pytest.raises(ValueError, match="not supported"):
        dtypes.of(torch.complex64)


@pytest.mark.parametrize("a,b", list(itertools.product(ALL, repeat=2)), ids=str)
def test_promote_is_torch_promote_types(a, b):
    try:
        expected = torch.promote_types(a.torch, b.torch)
    except RuntimeError:  # torch refuses some pairs (float8, uint16/32/64 with others): so do we
        with pytest.raises(RuntimeError):
            dtypes.promote(a, b)
        return
    assert dtypes.promote(a, b) == expected


@pytest.mark.parametrize("d", [dtypes.bfloat16, dtypes.float16, dtypes.float32, dtypes.float64], ids=str)
def test_first_is_finite(d):
    for v in (0.0, -1.5, 3e38 if d.itemsize >= 4 else 1e4, math.inf, -math.inf, math.nan):
        raw = torch.tensor([v, 1.0], dtype=torch.float64).to(d.torch).view(torch.uint8).numpy().tobytes()
        expected = bool(torch.isfinite(torch.tensor(v, dtype=torch.float64).to(d.torch)))
        assert d.first_is_finite(raw) == expected, v
        assert d.first_is_finite(b"\0" * d.itemsize + raw, offset=d.itemsize) == expected, v


def test_native_tags_match_the_native_module():
    from mergekit_fast import _native

    tags = {d.name: d.native for d in ALL if d.native is not None}
    assert tags == {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}  # csrc/common/dtype.h
    assert _native.dtype_tag(torch.bfloat16) == 2
    with pytest.raises(ValueError, match="do not take"):
        _native.dtype_tag(torch.int8)
