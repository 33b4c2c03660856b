"""Unit tests of the engine's parts: the buffer pool, shard assignment and job making."""

from __future__ import annotations

import math
import threading
import time

import pytest

from mergekit_fast import dtypes
from mergekit_fast.engine.buffers import BufferPool
from mergekit_fast.engine.jobs import BATCH_MAX_TENSORS, assign_shards, make_jobs, shard_names
from mergekit_fast.plan import InputRef, MergePlan, OutputTensor


def _t(name, shape, method="slerp", inputs=(), dtype=dtypes.bfloat16, out=None, params=(("t", 0.5),)):
    return OutputTensor(name=name, shape=tuple(shape), in_dtype=dtype, out_dtype=out or dtype, method=method,
                        inputs=tuple(inputs), params=params)  # fmt: skip


# ----------------------------------------------------------------------------- BufferPool


def test_pool_reuses_the_smallest_fitting_buffer():
    pool = BufferPool(1 << 20)
    a, b = pool.acquire(1000), pool.acquire(5000)
    pool.release(a)
    pool.release(b)
    assert pool.held == 6000 and pool.in_use == 0
    c = pool.acquire(900)
    assert c is a  # the smallest free buffer that fits
    d = pool.acquire(4000)
    assert d is b and pool.held == 6000


def test_pool_blocks_at_the_budget_until_a_release():
    pool = BufferPool(10_000)
    a = pool.acquire(6000)
    got = []

    def second():
        got.append(pool.acquire(6000))

    th = threading.Thread(target=second)
    th.start()
    time.sleep(0.1)
    assert not got  # 6000 + 6000 > 10000: waits
    pool.release(a)
    th.join(5)
    assert got and pool.in_use == 6000 and pool.held <= 10_000


def test_pool_serves_an_oversized_request_alone():
    pool = BufferPool(1000)
    big = pool.acquire(5000)  # larger than the whole budget: served because nothing else is in use
    assert len(big) >= 5000 and pool.in_use == 5000
    pool.release(big)
    assert pool.held == 0  # over budget: not kept
    small = pool.acquire(10)
    assert len(small) >= 10


def test_pool_drops_free_buffers_to_make_room():
    pool = BufferPool(10_000)
    a = pool.acquire(4000)
    pool.release(a)
    b = pool.acquire(8000)  # the free 4000 does not fit; dropped so that 8000 fits the budget
    assert len(b) >= 8000 and pool.held == 8000


def test_pool_quantum_keeps_buffers_interchangeable():
    # Jobs of 8, 32 and 117 MB at 7B, scaled: with a quantum of the bulk size every buffer fits every
    # bulk job, so a mix of sizes reuses the same buffers instead of dropping and allocating.
    pool = BufferPool(4 * 117, quantum=117)
    bufs = [pool.acquire(n) for n in (117, 8, 32)]
    assert [len(b) for b in bufs] == [117, 117, 117] and pool.held == 3 * 117
    for b in bufs:
        pool.release(b)
    again = [pool.acquire(n) for n in (32, 117, 117)]
    assert {id(b) for b in again} == {id(b) for b in bufs} and pool.held == 3 * 117
    for b in again:
        pool.release(b)
    assert len(pool.acquire(300)) == 300  # larger than the quantum: its own size


def test_pool_buffers_take_huge_pages_where_the_system_offers_them():
    import mmap

    pool = BufferPool(8 << 20)
    buf = pool.acquire(4 << 20)
    buf[:] = b"\x01" * len(buf)  # touch every page
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no MADV_HUGEPAGE on this platform")
    from pathlib import Path

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off here")
    # The hint is visible in the mapping's flags (smaps "VmFlags: ... hg"), whether or not the kernel
    # found a huge page for it.
    from mergekit_fast.io import kernel

    addr = kernel.buffer_address(buf)
    flags = None
    for block in Path("/proc/self/smaps").read_text().split("\n"):
        if "-" in block.split(" ")[0] and not block.startswith("VmFlags"):
            lo, hi = (int(x, 16) for x in block.split(" ")[0].split("-"))
            inside = lo <= addr < hi
        elif block.startswith("VmFlags") and inside:
            flags = block.split()[1:]
            break
    assert flags is not None and "hg" in flags


def test_pool_reserve_accounts_outside_memory():
    pool = BufferPool(10_000)
    pool.reserve(7000)
    assert pool.in_use == 7000
    done = []
    th = threading.Thread(target=lambda: done.append(pool.acquire(5000)))
    th.start()
    time.sleep(0.1)
    assert not done
    pool.unreserve(7000)
    th.join(5)
    assert done


def test_pool_close_wakes_waiters_with_an_error():
    pool = BufferPool(1000)
    pool.acquire(800)
    errors = []

    def waiter():
        try:
            pool.acquire(800)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.05)
    pool.close()
    th.join(5)
    assert errors and "aborted" in str(errors[0])


# ----------------------------------------------------------------------------- shards


def test_assign_shards_like_mergekit():
    ts = [_t(f"t{i}", (100,)) for i in range(5)]  # 200 bytes each in bf16
    shards = assign_shards(ts, 450)
    assert [[t.name for t in s] for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    # a tensor larger than the budget gets a shard of its own
    big = [_t("a", (10,)), _t("b", (1000,)), _t("c", (10,))]
    assert [[t.name for t in s] for s in assign_shards(big, 100)] == [["a"], ["b"], ["c"]]
    assert assign_shards([], 100) == []
    # the budget counts the OUTPUT dtype
    f32 = [_t(f"t{i}", (100,), out=dtypes.float32) for i in range(2)]
    assert len(assign_shards(f32, 500)) == 2


def test_shard_names():
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


# ----------------------------------------------------------------------------- jobs


class _Src:
    def __init__(self, tensors):
        self.tensors = tensors


class _Info:
    def __init__(self, file, start, dtype=dtypes.bfloat16, shape=(4,)):
        self.file, self.start, self.dtype, self.shape = file, start, dtype, shape
        self.nbytes = math.prod(shape) * dtype.itemsize


def _plan(tensors, infos):
    return MergePlan(sources={"m": _Src(infos)}, tensors=tensors, out_config={}, tokenizer_source=None,
                     config_yaml="")  # fmt: skip


def test_make_jobs_orders_by_input_position_and_batches_small_slerps():
    names = [f"x{i}" for i in range(6)]
    infos = {n: _Info("f1" if i % 2 else "f0", 1000 - i) for i, n in enumerate(names)}
    big = 1 << 16  # above the segmented-kernel limit: a job of its own
    infos["big"] = _Info("f0", 5, shape=(big,))
    infos["cp"] = _Info("f0", 7)
    ts = [_t(n, (4,), inputs=[InputRef("m", n), InputRef("m", n)]) for n in names]
    ts.append(_t("big", (big,), inputs=[InputRef("m", "big"), InputRef("m", "big")]))
    ts.append(_t("cp", (4,), method="passthrough", inputs=[InputRef("m", "cp")], params=(("scale", None),)))
    jobs = make_jobs(_plan(ts, infos))
    kinds = [(j.kind, [t.name for t in j.tensors]) for j in jobs]
    # file f0 first (big at 5, cp at 7, then the batch keyed by its first tensor), then f1's batch
    assert kinds[0] == ("one", ["big"]) and kinds[1] == ("copy", ["cp"])
    batches = [k for k in kinds if k[0] == "slerp_batch"]
    assert sorted(n for _, ns in batches for n in ns) == sorted(names)
    for _, ns in batches:  # each batch is sorted by input position
        keys = [(infos[n].file, infos[n].start) for n in ns]
        assert keys == sorted(keys)
    assert [j.key for j in jobs] == sorted(j.key for j in jobs)


def test_make_jobs_caps_batch_size():
    n = BATCH_MAX_TENSORS + 10
    infos = {f"x{i}": _Info("f", i) for i in range(n)}
    ts = [_t(f"x{i}", (4,), inputs=[InputRef("m", f"x{i}")] * 2) for i in range(n)]
    jobs = make_jobs(_plan(ts, infos))
    assert [len(j.tensors) for j in jobs] == [BATCH_MAX_TENSORS, 10]


def test_make_jobs_copies_only_without_a_dtype_change():
    infos = {"a": _Info("f", 0), "b": _Info("f", 8, dtype=dtypes.float16)}
    ts = [
        _t("a", (4,), method="passthrough", inputs=[InputRef("m", "a")], params=(("scale", None),)),
        _t("b", (4,), method="passthrough", inputs=[InputRef("m", "b")], params=(("scale", None),)),
        _t("c", (4,), method="passthrough", inputs=[InputRef("m", "a")], params=(("scale", 2.0),)),
    ]
    kinds = {j.tensors[0].name: j.kind for j in make_jobs(_plan(ts, infos))}
    assert kinds == {"a": "copy", "b": "one", "c": "one"}  # b: f16 input, bf16 output; c: scaled


@pytest.mark.parametrize("n", [0, 1])
def test_make_jobs_small_plans(n):
    infos = {"a": _Info("f", 0)}
    ts = [_t("a", (4,), inputs=[InputRef("m", "a")] * 2)][:n]
    assert len(make_jobs(_plan(ts, infos))) == n


# ----------------------------------------------------------------------------- shards as units of work


def test_shards_written_separately_equal_one_run(tmp_path):
    """An executor hands out shards: writing them in two groups gives the bytes of one run."""
    from mergekit_fast.config import parse_config
    from mergekit_fast.engine import MergeOptions, ShardLayout, write_shards
    from mergekit_fast.plan import build_plan
    from mergekit_fast.testing import make_synthetic_model

    a = make_synthetic_model(tmp_path / "a", seed=1, num_layers=3)
    b = make_synthetic_model(tmp_path / "b", seed=2, num_layers=3)
    text = f"models:\n  - model: {a}\n  - model: {b}\nmerge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.3}}\n"
    opt = MergeOptions(out_shard_size=30_000)

    def plan():
        return build_plan(parse_config(text), use_transformers=False)

    layout = ShardLayout.of(plan(), opt.out_shard_size)
    assert len(layout.names) >= 4
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir()
    parts.mkdir()
    full = write_shards(plan(), layout, whole, opt)
    odd = write_shards(plan(), layout, parts, opt, only=range(1, len(layout.names), 2))
    even = write_shards(plan(), layout, parts, opt, only=range(0, len(layout.names), 2))
    assert odd.bytes_written + even.bytes_written == full.bytes_written == layout.total
    for name in layout.names:
        assert (whole / name).read_bytes() == (parts / name).read_bytes(), name


def test_read_ahead_and_write_behind_change_no_byte(tmp_path):
    """The IO hints (read-ahead threads, write-behind with sync_file_range, its waits and page drops) only
    change timing: every strategy (native in place, torch + pwrite, file-to-file copy, streamed chunks)
    writes the same bytes with them at their most aggressive as with them off."""
    from mergekit_fast.config import parse_config
    from mergekit_fast.engine import MergeOptions, run_merge
    from mergekit_fast.plan import build_plan
    from mergekit_fast.testing import make_synthetic_model

    a = make_synthetic_model(tmp_path / "a", seed=1, num_layers=3)
    b = make_synthetic_model(tmp_path / "b", seed=2, num_layers=3)
    configs = {
        "slerp": f"models:\n  - model: {a}\n  - model: {b}\nmerge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.3}}\n",
        "linear_f32": f"models:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\n"
        "merge_method: linear\nout_dtype: float32\n",
        "passthrough": f"slices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n  - sources:\n      - {{model: {b}, layer_range: [1, 3]}}\n"
        "merge_method: passthrough\n",
    }
    off = {"read_ahead": 0, "write_behind": 0}
    hard = {"read_ahead": 1, "write_behind": 1}  # wait for every tensor's write-back but the last
    for name, text in configs.items():
        for extra in ({}, {"max_memory": 64 << 10}):  # the second streams the larger tensors in chunks
            outs = []
            for io in (off, hard):
                out = tmp_path / f"{name}-{len(extra)}-{io['write_behind']}"
                opt = MergeOptions(
                    out_shard_size=200_000, progress=False, write_model_card=False, **io, **extra
                )
                run_merge(build_plan(parse_config(text), use_transformers=False), out, opt)
                outs.append(out)
            files = sorted(p.name for p in outs[0].iterdir())
            assert files == sorted(p.name for p in outs[1].iterdir()) and len(files) > 2
            for f in files:
                assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), (name, extra, f)
