"""The counter-based generator: Philox4x32-10 against Random123's known-answer vectors, and the
properties the random merge methods rely on (pure function of seed, name, stream and index)."""

from __future__ import annotations

import torch

from mergekit_fast.methods import rng


def _block(c, k):
    t = [torch.tensor([x], dtype=torch.int64) for x in c]
    return [int(v) for v in rng.philox4x32(*t, *k)]


def test_philox4x32_10_known_answers():
    # Random123's kat_vectors for philox4x32_10 (the generator of cuRAND's Philox, too)
    assert _block([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _block([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert _block([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1,
    ]  # fmt: skip


def test_fnv1a_hash():
    # FNV-1a 64 of the empty string is its offset basis; our hash appends "\0" + 4-byte stream
    assert rng._FNV_OFFSET == 0xCBF29CE484222325
    assert rng.stream_hash("a", 0) != rng.stream_hash("a", 1) != rng.stream_hash("b", 0)
    assert rng.stream_hash("model.layers.0.mlp.up_proj.weight", 3) == rng.stream_hash(
        "model.layers.0.mlp.up_proj.weight", 3
    )


def test_words_are_a_pure_function_of_the_index():
    full = rng.words(7, "x", 2, 103)
    for start, n in ((0, 1), (1, 5), (3, 9), (50, 53), (100, 3)):
        assert torch.equal(rng.words(7, "x", 2, n, start), full[start : start + n])
    assert not torch.equal(rng.words(8, "x", 2, 103), full)
    assert not torch.equal(rng.words(7, "y", 2, 103), full)
    assert not torch.equal(rng.words(7, "x", 3, 103), full)
    assert int(full.min()) >= 0 and int(full.max()) <= 0xFFFFFFFF
    # seeds are taken mod 2^64 (negative seeds too)
    assert torch.equal(rng.words(-1, "x", 0, 8), rng.words(2**64 - 1, "x", 0, 8))


def test_uniform_and_bernoulli_statistics():
    u = rng.uniform(1, "t", 0, 1 << 20)
    assert u.dtype == torch.float32 and float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 3e-3
    keep = rng.bernoulli(0.3, 1, "t", 0, (1024, 1024))
    frac = keep.float().mean().item()
    assert abs(frac - 0.3) < 5 * (0.3 * 0.7 / 2**20) ** 0.5
    assert rng.bernoulli(1.0, 1, "t", 0, (10,)).all() and not rng.bernoulli(0.0, 1, "t", 0, (10,)).any()


def test_randint_range():
    idx = rng.randint(1000, 5, "q", 0, 100_000)
    assert int(idx.min()) >= 0 and int(idx.max()) < 1000
    counts = torch.bincount(idx, minlength=1000).float()
    assert counts.std() / counts.mean() < 0.13  # binomial: about 1/sqrt(100) = 0.1
