"""mergekit_fast.io.kernel (the GIL-free madvise / sync_file_range / fadvise wrappers) and the sharded
synthetic checkpoints of testing.make_synthetic_model. The oracle: the bytes written (plain file reads,
safetensors' own loader), which hints must never change."""

from __future__ import annotations

import json
import mmap
import os

import torch
from safetensors.torch import load_file

from mergekit_fast.io import kernel
from mergekit_fast.io.safetensors import ShardReader
from mergekit_fast.testing import make_synthetic_model


def test_page_range_covers_whole_pages():
    p = kernel.PAGE
    assert kernel.page_range(10 * p, 0, 1) == (0, p)
    assert kernel.page_range(10 * p, p + 1, 2 * p) == (p, p)
    assert kernel.page_range(10 * p, p - 1, p + 1) == (0, 2 * p)
    assert kernel.page_range(3 * p + 5, 3 * p, 3 * p + 5) == (3 * p, 5)  # clipped to the mapping


def test_madvise_hints_keep_contents(tmp_path):
    data = os.urandom(5 * kernel.PAGE + 123)
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        base = kernel.buffer_address(mm)
        assert base is None or base > 0
        for b in (base, None):  # through the C library and through mmap.madvise
            kernel.madvise(mm, b, kernel.MADV_POPULATE_READ, 0, len(data))
            kernel.madvise(mm, b, kernel.MADV_DONTNEED, 100, 3 * kernel.PAGE)
            kernel.madvise(mm, b, kernel.MADV_POPULATE_READ, 7, 7)  # empty range: nothing
            assert mm[:] == data
        kernel.fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        kernel.fadvise(-1, 0, 0, os.POSIX_FADV_WILLNEED)  # errors ignored: a hint
        assert mm[:] == data
        mm.close()
        kernel.madvise(mm, base, kernel.MADV_DONTNEED, 0, 10)  # closed: a no-op, no crash


def test_writable_buffer_address_is_its_first_byte():
    buf = bytearray(b"abcdef")
    addr = kernel.buffer_address(buf)
    assert addr is not None
    import ctypes

    assert ctypes.string_at(addr, 6) == b"abcdef"


def test_sync_file_range_writes_back(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(3 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        flags = kernel.SYNC_FILE_RANGE_WRITE
        ok = kernel.sync_file_range(fd, 0, 1 << 20, flags)
        assert ok == kernel.has_sync_file_range()
        wait = (
            kernel.SYNC_FILE_RANGE_WAIT_BEFORE
            | kernel.SYNC_FILE_RANGE_WRITE
            | kernel.SYNC_FILE_RANGE_WAIT_AFTER
        )
        kernel.sync_file_range(fd, 0, len(data), wait)
        assert not kernel.sync_file_range(fd, 0, 0, flags)  # nothing to do
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_sharded_synthetic_model_equals_unsharded(tmp_path):
    kw = dict(num_layers=2, hidden_size=64, intermediate_size=96, vocab_size=128, num_heads=4, num_kv_heads=2)
    one = make_synthetic_model(tmp_path / "one", seed=3, **kw)
    # 64 * 128 * 2 bytes = 16 KiB embeddings; 40 KiB shards cut the model into several files
    many = make_synthetic_model(tmp_path / "many", seed=3, max_shard_size=40 << 10, **kw)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) > 2 and sorted(p.name for p in many.glob("*.safetensors")) == files
    ref = load_file(one / "model.safetensors")
    got = {}
    for f in files:
        part = load_file(many / f)
        assert all(index["weight_map"][n] == f for n in part)
        assert (many / f).stat().st_size <= (40 << 10) + 4096 or len(part) == 1  # a larger tensor alone
        got.update(part)
    assert got.keys() == ref.keys()
    for name, t in ref.items():
        assert torch.equal(got[name], t), name
    itemsize = 2
    assert index["metadata"]["total_size"] == sum(t.numel() for t in ref.values()) * itemsize
    # save_pretrained's order: the embeddings open the first shard, lm_head closes the last
    with ShardReader(many / files[0]) as r:
        assert "model.embed_tokens.weight" in r.tensors
    with ShardReader(many / files[-1]) as r:
        assert "lm_head.weight" in r.tensors
