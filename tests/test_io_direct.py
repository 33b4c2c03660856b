"""Direct I/O (mergekit_fast/io/direct.py) and the merge path that uses it (staging.CpuDirect).

The oracle is the file itself read with plain buffered ``open().read()``, and, for merges, the same
merge run through the page-cache path (``direct_io=False``): the bytes must be the same.
"""

from __future__ import annotations

import errno
import mmap
import os
import random

import pytest
import torch
from fixtures_models import make_model
from helpers import needs_native, read_model

from mergekit_fast.api import merge
from mergekit_fast.engine import staging
from mergekit_fast.io import direct
from mergekit_fast.testing import slerp_gradient_config

pytestmark = pytest.mark.skipif(not direct.supported(), reason="no O_DIRECT on this platform")

A = direct.ALIGN
SIZE = 5 * A + 123  # a file that ends inside a page


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(random.Random(0).randbytes(SIZE))
    fd = direct.open_read(path)
    if fd is None:
        pytest.skip(f"{tmp_path}: the filesystem does not do O_DIRECT")
    fallback = os.open(path, os.O_RDONLY)
    yield path, fd, fallback
    os.close(fd)
    os.close(fallback)


# (start, nbytes): aligned, unaligned at either end, within one page, across the file's last page
RANGES = [(0, A), (0, 3 * A), (5, 10), (A - 1, 2), (100, 2 * A + 17), (3 * A, SIZE - 3 * A),
          (SIZE - 50, 50), (0, SIZE), (2 * A + 7, SIZE - 2 * A - 7)]  # fmt: skip


@pytest.mark.parametrize(("start", "nbytes"), RANGES)
def test_read_into_gives_the_file_bytes(data_file, start, nbytes):
    path, fd, fallback = data_file
    buf = mmap.mmap(-1, direct.span(start, nbytes))
    off = direct.read_into(fd, fallback, start, nbytes, buf)
    assert off == start % A
    assert buf[off : off + nbytes] == path.read_bytes()[start : start + nbytes]


def test_read_into_past_the_end_raises(data_file):
    _, fd, fallback = data_file
    buf = mmap.mmap(-1, direct.span(SIZE - 10, 20))
    with pytest.raises(EOFError, match=f"before byte {SIZE + 10}"):
        direct.read_into(fd, fallback, SIZE - 10, 20, buf)


def test_read_into_falls_back_when_the_kernel_refuses(data_file, monkeypatch):
    # A device that refuses the alignment (EINVAL) gets the rest read through the page cache.
    path, fd, fallback = data_file
    real = os.preadv
    calls = []

    def preadv(f, bufs, offset):
        calls.append(f)
        if f == fd:
            raise OSError(errno.EINVAL, "refused")
        return real(f, bufs, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    buf = mmap.mmap(-1, direct.span(100, 2 * A))
    off = direct.read_into(fd, fallback, 100, 2 * A, buf)
    assert buf[off : off + 2 * A] == path.read_bytes()[100 : 100 + 2 * A]
    assert fd in calls and fallback in calls


@pytest.mark.parametrize("use_direct", [True, False])
@pytest.mark.parametrize(("start", "nbytes"), [(0, 2 * A), (10, 3 * A), (A - 3, 6), (7, 5), (A, 4 * A + 9)])
def test_write_from_writes_exactly_the_range(tmp_path, use_direct, start, nbytes):
    path = tmp_path / "out.bin"
    before = random.Random(1).randbytes(6 * A)
    path.write_bytes(before)
    payload = random.Random(2).randbytes(nbytes)
    buf = mmap.mmap(-1, direct.span(start, nbytes))  # page-aligned; the bytes at start % ALIGN
    lead = start % A
    buf[lead : lead + nbytes] = payload
    fallback = os.open(path, os.O_WRONLY)
    fd = direct.open_write(path) if use_direct else None
    if use_direct and fd is None:
        pytest.skip("the filesystem does not do O_DIRECT")
    try:
        direct.write_from(fd, fallback, start, memoryview(buf)[lead : lead + nbytes])
    finally:
        os.close(fallback)
        if fd is not None:
            os.close(fd)
    expected = before[:start] + payload + before[start + nbytes :]
    assert path.read_bytes() == expected


def test_open_returns_none_where_the_filesystem_refuses(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"x" * A)

    def refuse(p, flags, *a):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "open", refuse)
    assert direct.open_read(path) is None
    assert direct.open_write(path) is None


def test_open_other_errors_are_raised(tmp_path):
    with pytest.raises(FileNotFoundError):
        direct.open_read(tmp_path / "missing")


# --- merges -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("direct_models")
    # Small shards: many tensors start and end inside pages and share pages with their neighbours.
    shape = {"num_layers": 4, "hidden_size": 64, "intermediate_size": 176}  # MLP tensors of 5.5 pages
    return (make_model(root / "a", seed=11, max_shard_size="40KB", **shape),
            make_model(root / "b", seed=12, **shape))  # fmt: skip


def _evict(*models):
    """Drop the models' files from the page cache (fsync first: only clean pages can be dropped)."""
    for model in models:
        for f in model.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _merge(pair, out, *, evict=True, **kw):
    if evict:
        _evict(*pair)  # cold inputs: the direct path is taken for them
    cfg = slerp_gradient_config(str(pair[0]), str(pair[1]), 4)
    merge(cfg, out, device="cpu", progress=False, write_model_card=False, **kw)
    return out


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}


def _count_loads(monkeypatch):
    seen = []
    real = staging.CpuDirect.load

    def load(self, job):
        seen.append(len(job.tensors))
        return real(self, job)

    monkeypatch.setattr(staging.CpuDirect, "load", load)
    return seen


@needs_native
def test_direct_merge_writes_the_same_bytes_as_the_page_cache_path(pair, tmp_path, monkeypatch):
    seen = _count_loads(monkeypatch)
    direct_out = _merge(pair, tmp_path / "direct")
    assert seen, "the direct path did not run"
    cached = _merge(pair, tmp_path / "cached", direct_io=False)
    a, b = _files(direct_out), _files(cached)
    assert a.keys() == b.keys() and a == b
    assert read_model(direct_out).keys() == read_model(cached).keys()


@needs_native
def test_direct_merge_with_buffers_smaller_than_a_job(pair, tmp_path, monkeypatch):
    # Every job's input buffer exceeds its model's share and every output buffer the memory budget: each
    # is served alone, and the merge still completes (one acquire per job and model, no deadlock).
    monkeypatch.setattr(staging.ReadAhead, "CHUNK", 1)
    seen = _count_loads(monkeypatch)
    small = _merge(pair, tmp_path / "small", read_ahead=1, max_memory=1024)
    assert seen and max(seen) > 1  # jobs of several tensors ran that way too
    assert _files(small) == _files(_merge(pair, tmp_path / "cached", direct_io=False))


def test_bulk_size_is_the_byte_weighted_median():
    assert staging.bulk_size([]) == 0
    assert staging.bulk_size([5]) == 5
    # A 7B layer per model: three 117 MB MLP tensors hold most bytes, whatever the count of small ones.
    layer = [117, 117, 117, 32, 32, 8, 8, 0]
    assert staging.bulk_size(layer * 32 + [250]) == 117
    assert staging.bulk_size([1, 1, 1, 1, 10]) == 10  # 10 of 14 bytes
    assert staging.bulk_size([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 10]) == 1  # the middle byte is a 1


@needs_native
def test_direct_reads_keep_reading_while_jobs_wait_for_the_compute(pair, tmp_path, monkeypatch):
    # A job's input and output buffers are taken when its compute starts, not when it is loaded: a job
    # waiting between the stages holds no memory that a read ahead of it would need.
    monkeypatch.setattr(staging.ReadAhead, "CHUNK", 1)
    held_after_load, made = [], []
    real_load, real_init = staging.CpuDirect.load, staging.DirectReads.__init__

    def load(self, job):
        real_load(self, job)
        held_after_load.append(len(job.direct_bufs) + len(job.out_bufs))

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        made.append(self)

    allocs: dict[int, int] = {}
    real_alloc = staging.BufferPool._alloc

    def alloc(self, nbytes):
        allocs[id(self)] = allocs.get(id(self), 0) + 1
        return real_alloc(self, nbytes)

    monkeypatch.setattr(staging.CpuDirect, "load", load)
    monkeypatch.setattr(staging.DirectReads, "__init__", init)
    monkeypatch.setattr(staging.BufferPool, "_alloc", alloc)
    out = _merge(pair, tmp_path / "out", read_ahead=1)
    assert held_after_load and set(held_after_load) == {0}
    # Each model's pool holds the job in compute, DEPTH reads and one waiting, of its bulk job size, and
    # hands out buffers of at least that size (interchangeable between the jobs).
    (reads,) = made
    for model, items in reads.streams.items():
        # the buffer each job's read of this model really needs (its tensors' aligned spans)
        sizes = [
            sum(reads.run.reader(ref).direct_span(ref.tensor) for _, _, ref in refs) for _, refs in items
        ]
        pool = reads.pools[model]
        bulk = staging.bulk_size(sizes)
        assert 0 < bulk <= pool.quantum < 2 * bulk  # the estimate: a page more per tensor at most
        assert pool.budget == (reads.DEPTH + 2) * pool.quantum
        # no churn: the pool's buffers are allocated once, plus one per job larger than the quantum
        assert allocs.get(id(pool), 0) <= reads.DEPTH + 2 + sum(n > pool.quantum for n in sizes)
    assert _files(out) == _files(_merge(pair, tmp_path / "cached", direct_io=False))


def _cached_fraction(model):
    """The fraction of the model's tensor bytes in the page cache (mincore), or None where unknown."""
    from mergekit_fast.io.safetensors import ShardReader

    cached = total = 0
    for f in model.glob("*.safetensors"):
        with ShardReader(f) as reader:
            for name, info in reader.tensors.items():
                fraction = reader.resident(name) if info.nbytes else 0.0
                if fraction is None:
                    return None
                cached += fraction * info.nbytes
                total += info.nbytes
    return cached / total


def test_resident_follows_the_page_cache(pair):
    a = pair[0]
    for f in a.glob("*.safetensors"):
        f.read_bytes()
    if _cached_fraction(a) is None:
        pytest.skip("mincore is not available here")
    assert _cached_fraction(a) == 1.0
    _evict(a)
    assert _cached_fraction(a) < 0.5  # the pages holding the header (read to open the file) stay


@needs_native
def test_cached_inputs_merge_from_the_page_cache(pair, tmp_path, monkeypatch):
    # A direct read goes to the disk even for cached pages: inputs in the page cache keep the mapped path.
    for model in pair:
        for f in model.glob("*.safetensors"):
            f.read_bytes()
    seen = _count_loads(monkeypatch)
    out = _merge(pair, tmp_path / "warm", evict=False)
    assert not seen
    assert _files(out) == _files(_merge(pair, tmp_path / "cold"))
    assert seen  # the same merge cold took the direct path


@needs_native
def test_filesystem_without_direct_io_keeps_the_page_cache_path(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(direct, "open_read", lambda path: None)
    seen = _count_loads(monkeypatch)
    out = _merge(pair, tmp_path / "fallback")
    assert not seen
    assert _files(out) == _files(_merge(pair, tmp_path / "cached", direct_io=False))


@needs_native
def test_writer_without_direct_io_writes_through_the_page_cache(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(direct, "open_write", lambda path: None)
    seen = _count_loads(monkeypatch)
    out = _merge(pair, tmp_path / "w")
    assert seen
    assert _files(out) == _files(_merge(pair, tmp_path / "cached", direct_io=False))


def test_input_cut_short_during_the_merge_names_the_file_and_tensor(tmp_path):
    # Planning checks every tensor's range against the file; a file cut short after that (by another
    # process) is caught by the direct read itself.
    from mergekit_fast.io.safetensors import SafetensorsError, ShardReader

    model = make_model(tmp_path / "m", seed=21, num_layers=2, hidden_size=64, intermediate_size=176)
    shard = next(model.glob("*.safetensors"))
    reader = ShardReader(shard)
    try:
        name = max(reader.tensors, key=lambda n: reader.tensors[n].end)  # the last tensor in the file
        expected = reader.view(name).clone()
        buf = mmap.mmap(-1, reader.direct_span(name))
        off = reader.read_direct(name, buf)
        assert buf[off : off + expected.numel() * 2] == expected.view(-1).view(torch.uint8).numpy().tobytes()
        os.truncate(shard, shard.stat().st_size - 3 * A)
        with pytest.raises(SafetensorsError, match=rf"{shard.name}: reading tensor '{name}' failed"):
            reader.read_direct(name, buf)
    finally:
        reader.close()


@needs_native
def test_cli_no_direct_io_keeps_the_page_cache_path(pair, tmp_path, monkeypatch):
    from mergekit_fast import cli

    seen = _count_loads(monkeypatch)
    cfg = tmp_path / "c.yml"
    cfg.write_text(slerp_gradient_config(str(pair[0]), str(pair[1]), 4))
    _evict(*pair)
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress", "-q", "--no-direct-io"]) == 0
    assert not seen
    _evict(*pair)
    assert cli.main(["merge", str(cfg), str(tmp_path / "out2"), "--no-progress", "-q"]) == 0
    assert seen
    assert _files(tmp_path / "out") == _files(tmp_path / "out2")


@pytest.mark.parametrize("overlap", [False, True])
def test_io_floor_moves_every_byte_and_leaves_nothing(pair, tmp_path, overlap):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "io_floor.py"
    if not script.exists():
        pytest.skip("bench/ is not part of this tree (an installed sdist's tests)")
    out, res = tmp_path / "floor.bin", tmp_path / "floor.json"
    nbytes = 3 * A + 5  # an unaligned tail: the last block goes through the page cache
    cmd = [sys.executable, str(script), "--model", str(pair[0]), "--model", str(pair[1]),
           "--write-bytes", str(nbytes), "--out", str(out), "--json", str(res)]  # fmt: skip
    subprocess.run(cmd + (["--overlap"] if overlap else []), check=True, capture_output=True)
    r = json.loads(res.read_text())
    inputs = sum(f.stat().st_size for m in pair for f in m.glob("*.safetensors"))
    assert r["read_bytes"] == inputs and r["write_bytes"] == nbytes and r["overlap"] is overlap
    assert r["floor_s"] >= max(r["read_s"], r["write_s"])
    assert not out.exists()
    # --keep (bench_merge): the file stays for the caller to remove, untimed, with every byte written
    subprocess.run(cmd + ["--keep"], check=True, capture_output=True)
    assert out.stat().st_size == nbytes
