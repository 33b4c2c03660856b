"""``rng.randint`` for CPU callers, computed with numpy (a private module: not loaded as a merge method).

The draws are ``mergekit_fast.methods.rng``'s, bit for bit (tests/test_methods_other.py checks it): the
same Philox4x32-10 counters, keys and output words, the same ``(word * high) >> 32``. Only the
arithmetic differs: a 32 x 32-bit product is exact in uint64, so each round is a few whole-array
numpy operations on one thread, where the torch version splits every product into 16-bit limbs (about
four times the operations) and runs each of them through torch's thread pool. On a loaded 2-core
machine those many small parallel regions made a 1M-element draw take ~3 s instead of ~0.05 s.
"""

from __future__ import annotations

from mergekit_fast.methods import rng


def words(seed: int, name: str, stream: int, n: int):
    """The 32-bit words of elements 0 .. n - 1 (a numpy uint64 array), as ``rng.words``."""
    import numpy as np

    u = np.uint64
    mask = u(rng.MASK32)
    k0, k1 = (u(k) for k in rng.seed_key(seed))
    h = rng.stream_hash(name, stream)
    blocks = np.arange((n + 3) // 4, dtype=np.uint64)
    c0, c1 = blocks & mask, blocks >> u(32)
    c2 = np.full_like(blocks, u(h & rng.MASK32))
    c3 = np.full_like(blocks, u(h >> 32))
    m0, m1, w0, w1, s32 = u(rng.M0), u(rng.M1), u(rng.W0), u(rng.W1), u(32)
    for r in range(rng.ROUNDS):
        p0 = c0 * m0  # exact: both factors are below 2^32
        p1 = c2 * m1
        c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ k0, p1 & mask, (p0 >> s32) ^ c3 ^ k1, p0 & mask
        if r + 1 < rng.ROUNDS:
            k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
    return np.stack((c0, c1, c2, c3), axis=1).reshape(-1)[:n]


def randint(high: int, seed: int, name: str, stream: int, n: int):
    """``rng.randint(high, seed, name, stream, n)`` as a CPU int64 torch tensor."""
    import numpy as np
    import torch

    if not 0 < high < 2**31:
        raise ValueError(f"randint: high must be in (0, 2^31), got {high}")
    idx = (words(seed, name, stream, n) * np.uint64(high)) >> np.uint64(32)  # below 2^63: exact
    return torch.from_numpy(idx.astype(np.int64))
