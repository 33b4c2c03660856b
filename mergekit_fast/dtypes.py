"""Tensor dtypes by name, without importing torch.

Planning a merge, reading safetensors headers and running the native CPU kernels need only a
dtype's name, size and native tag; torch (about 2 s to import on a small CPU) is loaded only where
torch math runs. ``DType.torch`` gives the torch dtype, ``of()`` maps anything dtype-like back.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class DType:
    name: str  # torch's attribute name, also the config spelling: "bfloat16"
    code: str  # safetensors code: "BF16"
    itemsize: int
    kind: str  # "f" float, "i" signed int, "u" unsigned int, "b" bool
    native: int | None = None  # tag of csrc/common/dtype.h (mkf::DType) for the native kernels

    def __eq__(self, other) -> bool:
        """Equal to the DType, or the torch dtype, of the same name."""
        if isinstance(other, DType):
            return self.name == other.name
        if type(other).__name__ == "dtype" and type(other).__module__ == "torch":
            return str(other) == f"torch.{self.name}"
        return NotImplemented

    def __hash__(self) -> int:
        # Not torch's hash: a set or dict key of DTypes does not match torch dtypes; convert first.
        return hash(self.name)

    @property
    def is_float(self) -> bool:
        return self.kind == "f"

    @property
    def torch(self):
        import torch

        return getattr(torch, self.name)

    def __str__(self) -> str:
        return f"torch.{self.name}"  # what torch prints, so messages read the same either way

    __repr__ = __str__

    def first_is_finite(self, buf, offset: int = 0) -> bool:
        """Whether the element at byte ``offset`` of ``buf`` is finite (floats; others always are)."""
        if self.kind != "f":
            return True
        if self.name == "bfloat16":  # the upper half of a float32
            return math.isfinite(struct.unpack("<f", b"\0\0" + bytes(buf[offset : offset + 2]))[0])
        fmt = {"float16": "<e", "float32": "<f", "float64": "<d"}.get(self.name)
        if fmt is None:  # fp8 and other exotic floats: no cheap check here
            return True
        return math.isfinite(struct.unpack_from(fmt, buf, offset)[0])


_ALL = (
    DType("float64", "F64", 8, "f", 3),
    DType("float32", "F32", 4, "f", 0),
    DType("float16", "F16", 2, "f", 1),
    DType("bfloat16", "BF16", 2, "f", 2),
    DType("float8_e4m3fn", "F8_E4M3", 1, "f"),
    DType("float8_e5m2", "F8_E5M2", 1, "f"),
    DType("int64", "I64", 8, "i"),
    DType("int32", "I32", 4, "i"),
    DType("int16", "I16", 2, "i"),
    DType("int8", "I8", 1, "i"),
    DType("uint64", "U64", 8, "u"),
    DType("uint32", "U32", 4, "u"),
    DType("uint16", "U16", 2, "u"),
    DType("uint8", "U8", 1, "u"),
    DType("bool", "BOOL", 1, "b"),
)
BY_CODE: dict[str, DType] = {d.code: d for d in _ALL}
BY_NAME: dict[str, DType] = {d.name: d for d in _ALL}

float64, float32, float16, bfloat16 = (BY_NAME[n] for n in ("float64", "float32", "float16", "bfloat16"))
uint8 = BY_NAME["uint8"]


def of(x) -> DType:
    """The DType of a DType, a torch dtype, a tensor, or a name ("bfloat16", "torch.bfloat16", "BF16")."""
    if isinstance(x, DType):
        return x
    if isinstance(x, str):
        name = x[len("torch.") :] if x.startswith("torch.") else x
        d = BY_NAME.get(name) or BY_CODE.get(name)
        if d is None:
            raise ValueError(f"unknown dtype {x!r}")
        return d
    x = getattr(x, "dtype", x)  # a tensor
    d = BY_NAME.get(str(x).removeprefix("torch."))
    if d is None:
        raise ValueError(f"dtype {x} is not supported")
    return d


def promote(a: DType, b: DType) -> DType:
    """torch.promote_types for two dtypes (computed here for floats, by torch otherwise)."""
    if a == b:
        return a
    if a.is_float and b.is_float and a.itemsize >= 2 and b.itemsize >= 2:
        if a.itemsize == b.itemsize:  # float16 with bfloat16
            return float32
        return a if a.itemsize > b.itemsize else b
    if a.is_float != b.is_float and (a.itemsize >= 2 if a.is_float else b.itemsize >= 2):
        return a if a.is_float else b  # a float with an int or bool: the float
    import torch

    return of(torch.promote_types(a.torch, b.torch))


# ---------------------------------------------------------------------------- host roundings, as torch's
# Python floats rounded as torch's CPU casts round them (nearest even), for the scalar steps that the
# native paths replay without torch.


def round_f32(x: float) -> float:
    """x rounded to fp32 (overflow to +-inf, as a C cast from double does)."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def f32_bits(v: float) -> int:
    """The bit pattern of v rounded to fp32."""
    return struct.unpack("<I", struct.pack("<f", round_f32(v)))[0]


def f32_from_bits(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def round_to(name: str, x: float) -> float:
    """x rounded to fp32, then stored to the dtype ``name`` (bfloat16, float16 or float32); NaN stays."""
    v = round_f32(x)
    if name == "float32" or v != v:
        return v
    if name == "bfloat16":
        b = f32_bits(v)
        return f32_from_bits(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16)
    if name == "float16":
        try:
            return struct.unpack("<e", struct.pack("<e", v))[0]
        except OverflowError:
            return math.copysign(math.inf, v)
    raise ValueError(f"round_to: {name} is not bfloat16, float16 or float32")
