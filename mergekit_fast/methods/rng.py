"""Counter-based random numbers: the same draws on every backend, thread count, device and order.

The draw for element ``j`` of stream ``stream`` of output tensor ``name`` under seed ``seed`` is a pure
function of (seed, name, stream, j): Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
as 1, 2, 3", SC'11; the generator of cuRAND and Random123) with

    key     = (seed mod 2^32, (seed >> 32) mod 2^32)                      -- the run's --random-seed
    counter = (block mod 2^32, block >> 32, h mod 2^32, h >> 32)          -- block = j // 4
    h       = FNV-1a 64 of UTF-8(name) + b"\\0" + 4-byte little-endian stream

and element ``j`` takes output word ``j % 4`` of its block. A uniform draw in [0, 1) is
``(word >> 8) * 2^-24`` (exact in fp32); a Bernoulli(p) draw keeps where ``uniform < p`` (p in fp32);
an index below ``n`` is ``(word * n) >> 32``. The native kernels (csrc/common/philox.h) compute the same
words bit for bit. Streams separate independent draws of one tensor (one per input model).

This module is the torch implementation: 32-bit words held in int64 tensors, products split into
16-bit limbs so nothing overflows.
"""

from __future__ import annotations

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
MASK32 = 0xFFFFFFFF
ROUNDS = 10
_FNV_OFFSET, _FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


def stream_hash(name: str, stream: int = 0) -> int:
    """64-bit FNV-1a of the tensor name and the stream number (see the module docstring)."""
    h = _FNV_OFFSET
    for byte in name.encode("utf-8") + b"\0" + int(stream & MASK32).to_bytes(4, "little"):
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def seed_key(seed: int) -> tuple[int, int]:
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return s & MASK32, s >> 32


def _mulhilo(x, m: int):
    """(hi, lo) 32-bit halves of x * m for x an int64 tensor of uint32 values and m a 32-bit constant."""
    xl, xh = x & 0xFFFF, x >> 16
    ml, mh = m & 0xFFFF, m >> 16
    t0 = xl * ml
    t1 = xh * ml + xl * mh  # < 2^33
    lo = t0 + ((t1 & 0xFFFF) << 16)
    hi = xh * mh + (t1 >> 16) + (lo >> 32)
    return hi & MASK32, lo & MASK32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = ROUNDS):
    """Philox4x32-R on int64 tensors holding uint32 counters; returns the four output words."""
    for r in range(rounds):
        hi0, lo0 = _mulhilo(c0, M0)
        hi1, lo1 = _mulhilo(c2, M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < rounds:
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
    return c0, c1, c2, c3


def words(seed: int, name: str, stream: int, n: int, start: int = 0, device="cpu"):
    """The 32-bit words of elements start .. start + n - 1 (an int64 tensor of uint32 values)."""
    import torch

    if n <= 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    k0, k1 = seed_key(seed)
    h = stream_hash(name, stream)
    first, last = start // 4, (start + n - 1) // 4
    block = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    c2 = torch.full_like(block, h & MASK32)
    c3 = torch.full_like(block, h >> 32)
    out = philox4x32(block & MASK32, block >> 32, c2, c3, k0, k1)
    flat = torch.stack(out, dim=1).reshape(-1)
    off = start - first * 4
    return flat[off : off + n]


def uniform(seed: int, name: str, stream: int, n: int, start: int = 0, device="cpu"):
    """fp32 uniforms in [0, 1), 24 random bits each (exactly representable)."""
    import torch

    return (words(seed, name, stream, n, start, device) >> 8).to(torch.float32) * (2.0**-24)


def bernoulli(p, seed: int, name: str, stream: int, shape, device="cpu"):
    """A keep mask (bool tensor of ``shape``): element j is kept where uniform_j < p (p a number, or a
    tensor of ``shape`` of per-element probabilities, compared in fp32)."""
    import math

    import torch

    n = math.prod(shape)
    u = uniform(seed, name, stream, n, 0, device).view(tuple(shape))
    if isinstance(p, torch.Tensor):
        return u < p.to(torch.float32)
    return u < torch.tensor(float(p), dtype=torch.float32)


def randint(high: int, seed: int, name: str, stream: int, n: int, device="cpu"):
    """``n`` indices in [0, high) (int64), each ``(word * high) >> 32``; high < 2^31."""
    if not 0 < high < 2**31:
        raise ValueError(f"randint: high must be in (0, 2^31), got {high}")
    return (words(seed, name, stream, n, 0, device) * high) >> 32
