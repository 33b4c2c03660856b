"""How a job's bytes move: the staging strategies, chosen per job once, when the run starts.

Each strategy has four steps, called by the pipeline's three stages:

  load(job)     loader thread: make the inputs available (map, prefault, stage) and, for in-place
                outputs, map the output's pages;
  compute(job)  compute stage: run the job's method into output buffers (or in place);
  write(job)    writer thread: put the outputs at their offsets in their shards;
  recycle(job)  writer thread: drop input pages, return buffers.

Strategies:

  Copy        the output is the inputs' bytes: copied file to file (copy_file_range), no decoding.
  CpuNative   the method's native CPU kernel runs by address on the mapped inputs and writes straight
              into a shared mapping of the output shard: no output buffer, no copy, no torch.
  CpuDirect   CpuNative with direct I/O: inputs read past the page cache into pooled buffers
              (DirectReads, ahead of the loader), the output computed into a pooled buffer and its
              whole pages written directly (io/direct.py says why: the CPU cost of page-cache pages).
  CpuMapped   torch views of the mapped inputs (pages faulted on the loader thread), the method's
              torch compute into pooled output buffers, pwrite.
  CudaPinned  inputs staged through pinned buffers and copied to the GPU on a copy stream; compute on
              the device; the result copied back into pinned buffers on the compute stream.

An input with re-indexed rows (``InputRef.rows``: a vocabulary tensor in the output vocabulary) is
gathered by the loader from the mapped input (and, for filled rows, the other models' mapped inputs)
into a pooled buffer of the output's shape: on the CPU into the staged-input pool, on CUDA straight
into the pinned staging buffer that is then copied to the device. The native path never sees one.

Memory: every strategy accounts what it holds in the run's buffer pools (``--max-memory``).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field

from mergekit_fast import methods
from mergekit_fast.engine.buffers import BufferPool, as_bytes, carve
from mergekit_fast.engine.jobs import Job, params
from mergekit_fast.errors import MergeError
from mergekit_fast.io.safetensors import ShardWriter
from mergekit_fast.methods import Context
from mergekit_fast.plan import MergePlan, OutputTensor


@dataclass
class RunState:
    """What the strategies of one run share: the plan, the output shards, the pools, the counters."""

    plan: MergePlan
    writers: dict[str, ShardWriter]  # output tensor name -> its shard
    out_pool: BufferPool
    in_pool: BufferPool | None  # staged inputs: CUDA, and re-indexed vocabulary rows on the CPU
    backend: str
    threads: int
    seed: int | None
    progress: object  # callable(bytes written)
    bytes_read: int = 0
    bytes_written: int = 0
    finite_flags: list = field(default_factory=list)  # (name, bool or 0-d bool tensor)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reader(self, ref, name: str | None = None):
        """The reader of one file tensor of ``ref`` (default: its only one)."""
        src = self.plan.sources[ref.model]
        return src.reader(src.tensors[name or ref.tensor].file)

    def info(self, ref):
        """The stored tensor (for an input made of parts: its first part)."""
        return self.plan.sources[ref.model].tensors[ref.files[0]]

    def nbytes(self, ref) -> int:
        src = self.plan.sources[ref.model]
        return sum(src.tensors[f].nbytes for f in ref.files)

    def files(self, ref):
        """(reader, tensor name) of every file tensor ``ref`` reads, in order."""
        return [(self.reader(ref, f), f) for f in ref.files]

    def assemble_into(self, ref, out):
        """An input made of parts (an MoE checkpoint's per-expert tensors) copied into ``out``, a buffer of
        the fused tensor's shape, part after part (mergekit_fast.conversion)."""
        flat = out.view(-1)
        pos = 0
        for reader, name in self.files(ref):
            x = reader.view(name).reshape(-1)
            flat[pos : pos + x.numel()].copy_(x)
            pos += x.numel()
        self.count_read(self.nbytes(ref))
        if pos != flat.numel():
            raise MergeError(f"{ref.tensor}: its parts hold {pos} elements, the fused tensor {flat.numel()}")
        return out

    def count_read(self, n: int) -> None:
        with self.lock:
            self.bytes_read += n

    def count_written(self, n: int) -> None:
        with self.lock:
            self.bytes_written += n
        self.progress(n)

    def ctx(self, t: OutputTensor) -> Context:
        return Context(name=t.name, seed=self.seed, backend=self.backend, threads=self.threads)

    def release_inputs(self, job: Job) -> None:
        for t in job.tensors:
            for ref in t.inputs:
                for reader, name in self.files(ref):
                    reader.release(name)
                for other in ref.rows.sources if ref.rows is not None else ():
                    self.reader(other).release(other.tensor)

    def input_shape(self, ref, fused_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The shape the method sees: the stored one, the re-indexed one, or (parts) the fused one."""
        if ref.parts is not None:
            return fused_shape
        shape = tuple(self.info(ref).shape)
        return shape if ref.rows is None else ref.rows.out_shape(shape)

    def gather_into(self, ref, dtype, out=None):
        """The re-indexed input ``ref`` in ``dtype`` (written into ``out`` when given), from the mapped
        inputs (mergekit_fast.vocabulary.gather)."""
        from mergekit_fast.vocabulary import gather

        seen: set = set()

        def view(r):
            if (r.model, r.tensor) not in seen:  # each input read counted once
                seen.add((r.model, r.tensor))
                self.count_read(self.info(r).nbytes)
            x = self.reader(r).view(r.tensor)
            return x if x.device.type == "cpu" else x.cpu()  # an in-memory input on another device

        return gather(ref.rows, view(ref), view, getattr(dtype, "torch", dtype), out)

    @property
    def nonfinite(self) -> list[str]:
        return [name for name, ok in self.finite_flags if not bool(ok)]


class Strategy:
    def __init__(self, run: RunState):
        self.run = run

    def load(self, job: Job) -> None:
        pass

    def compute(self, job: Job) -> None:
        pass

    def write(self, job: Job) -> None:
        for i, t in enumerate(job.tensors):
            self.run.count_written(self.run.writers[t.name].write(t.name, job.outputs[i]))

    def recycle(self, job: Job) -> None:
        run = self.run
        run.release_inputs(job)
        if job.reserved:
            run.out_pool.unreserve(job.reserved)
            job.reserved = 0
        for buf in job.staged:
            run.in_pool.release(buf)
        for buf in job.out_bufs:
            run.out_pool.release(buf)
        job.inputs.clear()
        job.targets.clear()
        job.outputs.clear()
        job.staged.clear()
        job.out_bufs.clear()

    def check_shapes(self, t: OutputTensor) -> None:
        if not methods.get(t.method).same_shape:
            return  # such methods check their inputs' shapes when they are planned
        for ref in t.inputs:
            if ref.parts is not None:
                continue  # the planner checked the parts make the fused shape
            info = self.run.info(ref)
            shape = self.run.input_shape(ref)
            if shape != tuple(t.shape):
                raise MergeError(
                    f"{info.file}: tensor {ref.tensor!r} has shape {shape}, expected {tuple(t.shape)}"
                )


class Copy(Strategy):
    """The output is the inputs' bytes one after another: file to file."""

    def write(self, job: Job) -> None:
        for t in job.tensors:
            parts = [part for ref in t.inputs for part in self.run.files(ref)]
            n = self.run.writers[t.name].copy_in(t.name, parts)
            self.run.count_read(n)
            self.run.count_written(n)


class CpuNative(Strategy):
    """The method's native kernel, by address, from the mapped inputs into the mapped output shard."""

    def load(self, job: Job) -> None:
        for t in job.tensors:
            self.check_shapes(t)
            ins = []
            for ref in t.inputs:
                reader = self.run.reader(ref)
                ins.append(reader.address(ref.tensor))
                self.run.count_read(self.run.info(ref).nbytes)
                # Fault the pages in here, on the loader thread, while compute works on the previous job.
                reader.prefault(ref.tensor)
            job.inputs.append(ins)
            job.targets.append(self.run.writers[t.name].target(t.name))  # map (and zero) the output pages

    def compute(self, job: Job) -> None:
        run = self.run
        ts = job.tensors
        job.reserved = sum(math.prod(t.shape) * t.out_dtype.itemsize for t in ts)
        run.out_pool.reserve(job.reserved)  # pages in flight until the writer drops them
        self.run_kernels(job)
        run.release_inputs(job)

    def first_bytes(self, job: Job, i: int) -> bytes:
        """The bytes of output tensor i's first element (b"" when it is empty)."""
        t = job.tensors[i]
        return self.run.writers[t.name].peek(t.name, t.out_dtype.itemsize)

    def run_kernels(self, job: Job) -> None:
        """The method's native kernel on the job's addresses, one call per input dtype, and the
        finite flags of the outputs."""
        run = self.run
        ts = job.tensors
        by_dtype: dict[object, list[int]] = {}
        for i, t in enumerate(ts):
            by_dtype.setdefault(t.in_dtype, []).append(i)
        for idx in by_dtype.values():
            group = [ts[i] for i in idx]
            flags = job.method.native_cpu(group, [job.inputs[i] for i in idx], [job.targets[i] for i in idx],
                                          run.threads, run.seed)  # fmt: skip
            if flags is None:
                # finite_probe "first": a NaN/Inf input makes every element NaN, so one element tells.
                flags = []
                for i, t in zip(idx, group):
                    first = self.first_bytes(job, i)
                    flags.append(not first or t.out_dtype.first_is_finite(first))
            run.finite_flags.extend((t.name, bool(ok)) for t, ok in zip(group, flags))

    def write(self, job: Job) -> None:
        for t in job.tensors:
            self.run.count_written(self.run.writers[t.name].commit(t.name))


class CpuDirect(CpuNative):
    """CpuNative with direct I/O (io/direct.py): the inputs are read past the page cache into pooled
    buffers by ``DirectReads``' threads, ahead of the loader; the kernel writes into one pooled output
    buffer per job, each tensor's bytes placed as they will sit in the file's pages, and the writer sends
    the whole pages to the disk directly. No page of input or output passes through the page cache or
    this process's page tables, which is what costs the CPU at 7B (the io/direct.py docstring)."""

    def __init__(self, run: RunState, reads: DirectReads, jobs: list[Job], cap: int):
        from mergekit_fast.io import direct

        super().__init__(run)
        self.reads = reads
        self.read_wait = 0.0  # seconds the compute stage waited for the reads (logged at INFO)
        # Its own output pool, bounded to the job being computed, the one being written and one queued,
        # within ``cap`` bytes: the writer is what the disk bounds, and output buffers queued behind it
        # are memory that buys nothing (a cold 7B SLERP: 2.4 GiB peak RSS with the shared 4 GiB pool,
        # 1.4 GiB with this one, the same time).
        typical = bulk_size([sum(direct.max_span(math.prod(t.shape) * t.out_dtype.itemsize) for t in job.tensors)
                             for job in jobs if job.direct])  # fmt: skip
        self.out_pool = BufferPool(min(cap, max(256 << 20, 3 * typical)), quantum=min(cap, typical))

    def load(self, job: Job) -> None:
        # The reading threads are this job's loader: its buffers are taken when its compute starts
        # (``compute``), so that no read waits for room held by jobs queued between the stages.
        for t in job.tensors:
            self.check_shapes(t)

    def _take(self, job: Job) -> None:
        from mergekit_fast.io import direct, kernel

        run = self.run
        t0 = time.perf_counter()
        bufs, where = self.reads.take(job)
        self.read_wait += time.perf_counter() - t0
        job.direct_bufs.extend(bufs)
        # One output buffer for the job (one acquire: a budget smaller than a job still lets it run);
        # tensor i starts at places[i], a page boundary plus its offset within its first file page.
        places, size = [], 0
        for t in job.tensors:
            lead = run.writers[t.name].lead(t.name)
            places.append(size + lead)
            size += direct.up(lead + math.prod(t.shape) * t.out_dtype.itemsize)
        out = self.out_pool.acquire(size)
        job.out_bufs.append(out)
        base = kernel.buffer_address(out)
        for ti, t in enumerate(job.tensors):
            ins = []
            for ri, ref in enumerate(t.inputs):
                buf, off = where[ti, ri]
                ins.append(0 if buf is None else kernel.buffer_address(buf) + off)
                run.count_read(run.info(ref).nbytes)
            job.inputs.append(ins)
            job.targets.append(base + places[ti])
        job.placed = places

    def compute(self, job: Job) -> None:
        try:
            self._take(job)
            self.run_kernels(job)
        finally:
            self._release_inputs(job)

    def first_bytes(self, job: Job, i: int) -> bytes:
        t = job.tensors[i]
        at = job.placed[i]
        return bytes(job.out_bufs[0][at : at + t.out_dtype.itemsize]) if math.prod(t.shape) else b""

    def _release_inputs(self, job: Job) -> None:
        for pool, buf in job.direct_bufs:
            pool.release(buf)
        job.direct_bufs.clear()

    def write(self, job: Job) -> None:
        out = memoryview(job.out_bufs[0])
        try:
            for t, at in zip(job.tensors, job.placed):
                w = self.run.writers[t.name]
                self.run.count_written(w.write_placed(t.name, out[at - w.lead(t.name) :]))
        finally:
            out.release()  # no export may outlive the write: the pool reuses and closes its buffers

    def recycle(self, job: Job) -> None:
        self._release_inputs(job)  # a job that failed before its compute
        job.placed = []
        for buf in job.out_bufs:
            self.out_pool.release(buf)
        job.out_bufs.clear()
        super().recycle(job)


def bulk_size(sizes: list[int]) -> int:
    """The byte-weighted median of ``sizes``: the size of the items that hold the middle byte of them all
    (0 for none)."""
    total, seen = sum(sizes), 0
    for n in sorted(sizes):
        seen += n
        if 2 * seen >= total:
            return n
    return 0


class DirectReads:
    """Reads the inputs of the direct jobs (``Job.direct``) ahead of their compute, past the page cache:
    per input model, ``DEPTH`` threads take the jobs in order and read each job's tensors of that model
    into one buffer of the model's pool (``budget`` bytes shared between the models, grown to hold the
    job in compute, ``DEPTH`` reads and one read waiting, of the model's bulk job size, within ``cap``
    bytes shared between the models; a job's buffer larger than the pool is read alone, once the
    model's earlier buffers are back). A direct read is one request per tensor, which the block layer
    splits into requests that are all in flight at once; with two such reads per model and the models
    read at the same time, the disk sees a deep queue. ``take`` hands a job's buffers to its compute
    (CpuDirect), which returns them to the pools once the kernels ran. An error (a short file, an I/O
    error) is raised by the ``take`` of the job that needed the tensor."""

    DEPTH = 2  # reading threads per model (reads in flight)

    def __init__(self, run: RunState, jobs: list[Job], budget: int, cap: int | None = None):
        self.run = run
        per: dict[str, list] = {}  # model -> [(job id, [(ti, ri, ref)])] in job order
        for job in jobs:
            if not job.direct:
                continue
            mine: dict[str, list] = {}
            for ti, t in enumerate(job.tensors):
                for ri, ref in enumerate(t.inputs):
                    mine.setdefault(ref.model, []).append((ti, ri, ref))
            for model, refs in mine.items():
                per.setdefault(model, []).append((id(job), refs))
        self.streams = per
        self.models_of: dict[int, list[str]] = {}
        for model, items in per.items():
            for key, _ in items:
                self.models_of.setdefault(key, []).append(model)
        # Each model's pool holds the job being computed, DEPTH reads in flight and one read done and
        # waiting for its compute, for the jobs that carry most of the bytes (their byte-weighted median
        # size; a larger one, the embeddings, is read with less overlap): a share smaller than that
        # serialises the reads behind the compute (at 7B, 117 MB tensors and the default 512 MB budget,
        # one read in flight per model and the disk half idle: 36 s against 28 s for a cold SLERP pair
        # on the 2-core VM, 2026-12-03).
        from mergekit_fast.io import direct

        share = max(ReadAhead.CHUNK, budget // max(1, len(per)))
        cap = (budget if cap is None else cap) // max(1, len(per))  # the run's memory budget, shared
        self.pools = {}
        for model, items in per.items():
            sizes = [
                sum(direct.max_span(self.run.info(ref).nbytes) for _, _, ref in refs) for _, refs in items
            ]
            bulk = bulk_size(sizes)
            self.pools[model] = BufferPool(
                min(max(share, (self.DEPTH + 2) * bulk), cap), quantum=min(bulk, cap)
            )
        self.ready: dict[tuple, tuple] = {}  # (job id, model) -> (pool, buffer, {(ti, ri): offset})
        self.failed: dict[tuple, BaseException] = {}
        self.cond = threading.Condition()
        self.closed = False
        self.threads: list[threading.Thread] = []
        self._started = False

    def _acquire(self, pool: BufferPool, refs: list) -> tuple:
        """(buffer or None, [(reader, tensor name, span)]) for one job's tensors of one model."""
        parts = [(reader, ref.tensor, reader.direct_span(ref.tensor)) for reader, ref in
                 ((self.run.reader(ref), ref) for _, _, ref in refs)]  # fmt: skip
        total = sum(span for _, _, span in parts)
        return (pool.acquire(total) if total else None), parts

    def _read(self, pool: BufferPool, refs: list, buf, parts: list) -> tuple:
        offsets, at = {}, 0
        try:
            with memoryview(buf) if buf is not None else contextlib.nullcontext() as mv:
                for (ti, ri, _), (reader, name, span) in zip(refs, parts):
                    offsets[ti, ri] = at + (reader.read_direct(name, mv[at : at + span]) if span else 0)
                    at += span
        except BaseException:
            if buf is not None:
                pool.release(buf)
            raise
        return pool, buf, offsets

    def _walk(self, model: str, items: list, state: dict) -> None:
        """One of the model's reading threads: items (and their buffers, so that an earlier job never
        waits for room taken by a later one) are handed out in job order; the reads overlap."""
        pool = self.pools[model]
        while True:
            key = None
            try:
                with state["lock"]:
                    if state["next"] >= len(items) or self.closed:
                        return
                    job_key, refs = items[state["next"]]
                    state["next"] += 1
                    key = (job_key, model)
                    buf, parts = self._acquire(pool, refs)
                result = self._read(pool, refs, buf, parts)
            except BaseException as exc:  # noqa: BLE001 - raised by the take that needs it
                with self.cond:
                    if not self.closed and key is not None:
                        self.failed[key] = exc
                    self.cond.notify_all()
                return
            with self.cond:
                if self.closed:
                    if result[1] is not None:
                        pool.release(result[1])
                    return
                self.ready[key] = result
                self.cond.notify_all()

    def _start(self) -> None:
        self._started = True
        for model, items in self.streams.items():
            state = {"lock": threading.Lock(), "next": 0}
            for _ in range(self.DEPTH):
                th = threading.Thread(target=self._walk, args=(model, items, state), name="mkf-direct-read",
                                      daemon=True)  # fmt: skip
                th.start()
                self.threads.append(th)

    def take(self, job: Job) -> tuple[list, dict]:
        """The job's input buffers once read: ([(pool, buffer)] to release after the compute,
        {(tensor index, input index): (buffer, offset of the tensor's first byte)}; buffer None for an
        empty tensor)."""
        if not self._started:
            self._start()
        bufs, where = [], {}
        for model in self.models_of.get(id(job), ()):
            key = (id(job), model)
            with self.cond:
                while key not in self.ready:
                    if key in self.failed:
                        for pool, buf in bufs:
                            pool.release(buf)
                        raise self.failed.pop(key)
                    if self.closed:
                        raise MergeError("merge aborted")
                    self.cond.wait()
                pool, buf, offsets = self.ready.pop(key)
            if buf is not None:
                bufs.append((pool, buf))
            where.update({k: (buf, off) for k, off in offsets.items()})
        return bufs, where

    def advance(self, current: int) -> None:
        if not self._started:
            self._start()

    def stop(self) -> None:
        """Wake and end every waiter (an abort): the reading threads end at their next step."""
        with self.cond:
            self.closed = True
            for pool, buf, _ in self.ready.values():
                if buf is not None:
                    pool.release(buf)
            self.ready.clear()
            self.cond.notify_all()
        for pool in self.pools.values():
            pool.close()  # wakes a thread waiting for room

    def close(self) -> None:
        self.stop()
        for th in self.threads:
            th.join()
        self.threads.clear()


class Prefetch:
    """The pipeline's read-ahead: several (``ReadAhead``'s hints, ``DirectReads``), told the same."""

    def __init__(self, *parts):
        self.parts = [p for p in parts if p is not None]

    def advance(self, current: int) -> None:
        for p in self.parts:
            p.advance(current)

    def close(self) -> None:
        for p in self.parts:
            p.close()


def all_finite(x):
    """0-d bool tensor: no NaN or Inf in ``x``. min/max propagate NaN and expose +-Inf, and one
    aminmax pass is ~10x faster on the CPU than isfinite(x).all() for 16-bit tensors."""
    import torch

    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    lo, hi = torch.aminmax(x)
    return torch.isfinite(lo) & torch.isfinite(hi)


class _TorchCompute(Strategy):
    """The method's torch compute on torch tensors (CPU views or staged device tensors)."""

    def merge(self, job: Job, outs=None) -> list:
        casted = [
            [x if x.dtype == t.in_dtype else x.to(t.in_dtype.torch) for x in ins]
            for t, ins in zip(job.tensors, job.inputs)
        ]
        method = job.method
        ctxs = [self.run.ctx(t) for t in job.tensors]
        ps = [params(t) for t in job.tensors]
        if len(job.tensors) > 1 or method.batch_max_numel:
            return method.compute_many(casted, ps, ctxs, outs)
        return [method.compute(casted[0], ps[0], ctxs[0], None if outs is None else outs[0])]

    def finish(self, job: Job, results: list) -> list:
        """Cast to the output dtype and queue a finiteness check of each result."""
        method = job.method
        final = []
        for t, r in zip(job.tensors, results):
            if r.dtype != t.out_dtype:
                r = r.to(t.out_dtype.torch)
            if r.is_floating_point():
                # A 0-d tensor: on CUDA it is read once at the end, so no sync here.
                probe = r.reshape(-1)[:1] if method.finite_probe == "first" else r
                self.run.finite_flags.append((t.name, all_finite(probe)))
            final.append(r)
        return final


class CpuMapped(_TorchCompute):
    """torch views of the mapped inputs; outputs in pooled buffers; pwrite."""

    def load(self, job: Job) -> None:
        gathered = []
        for t in job.tensors:
            self.check_shapes(t)
            ins = []
            for ref in t.inputs:
                if ref.rows is not None or ref.parts is not None:
                    gathered.append((len(job.inputs), len(ins), ref, t))
                    ins.append(None)
                    continue
                reader = self.run.reader(ref)
                view = reader.view(ref.tensor)
                if view.device.type != "cpu":  # an in-memory input on another device
                    view = view.cpu()
                ins.append(view)
                self.run.count_read(self.run.info(ref).nbytes)
                reader.prefault(ref.tensor)
            job.inputs.append(ins)
        if gathered:
            specs = [(t.in_dtype if ref.parts is None else self.run.info(ref).dtype, self.run.input_shape(ref, t.shape))
                     for _, _, ref, t in gathered]  # fmt: skip
            buf, outs = carve(self.run.in_pool, specs)
            job.staged.append(buf)
            for (i, k, ref, t), out in zip(gathered, outs):
                if ref.parts is not None:
                    job.inputs[i][k] = self.run.assemble_into(ref, out)
                else:
                    job.inputs[i][k] = self.run.gather_into(ref, t.in_dtype, out)

    def compute(self, job: Job) -> None:
        run = self.run
        outs = None
        if job.method.batch_max_numel:
            # Outputs straight into pooled buffers: no fresh allocations, no page faults.
            buf, outs = carve(run.out_pool, [(t.in_dtype, tuple(t.shape)) for t in job.tensors])
            job.out_bufs.append(buf)
        results = self.finish(job, self.merge(job, outs))
        # The inputs are no longer needed: drop their pages now, not when the job is written.
        run.release_inputs(job)
        pooled = {as_bytes(b).data_ptr() for b in job.out_bufs}
        extra = sum(r.nbytes for r in results if r.untyped_storage().data_ptr() not in pooled)
        if extra:
            run.out_pool.reserve(extra)
            job.reserved = extra
        job.outputs.extend(results)


class CudaPinned(_TorchCompute):
    """Inputs staged through pinned buffers to the GPU on a copy stream; results back to pinned buffers."""

    def __init__(self, run: RunState, device):
        super().__init__(run)
        import torch

        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self.compute_stream = torch.cuda.current_stream(device)

    def load(self, job: Job) -> None:
        import torch

        specs = []
        for t in job.tensors:
            self.check_shapes(t)
            ins = []
            for ref in t.inputs:
                if ref.rows is not None or ref.parts is not None:  # gathered / assembled on the host,
                    ins.append(ref)  # straight into the pinned buffer
                    dt = t.in_dtype if ref.parts is None else self.run.info(ref).dtype
                    specs.append((dt, self.run.input_shape(ref, t.shape)))
                    continue
                view = self.run.reader(ref).view(ref.tensor)
                self.run.count_read(self.run.info(ref).nbytes)
                ins.append(view)
                if view.device.type == "cpu":
                    specs.append((view.dtype, tuple(view.shape)))
            job.inputs.append(ins)
        # Stage every host input of the job through one pinned buffer, then copy to the device (an
        # in-memory input already on the GPU is used as it is).
        buf, staged = carve(self.run.in_pool, specs)
        job.staged.append(buf)
        it = iter(staged)
        with torch.cuda.stream(self.copy_stream):
            for t, ins in zip(job.tensors, job.inputs):
                for i, view in enumerate(ins):
                    if not isinstance(view, torch.Tensor):  # an InputRef with rows or parts: stage it here
                        host = next(it)
                        if view.parts is not None:
                            self.run.assemble_into(view, host)
                        else:
                            self.run.gather_into(view, t.in_dtype, host)
                    elif view.device.type != "cpu":
                        ins[i] = view.to(self.device, non_blocking=True)
                        continue
                    else:
                        host = next(it)
                        host.copy_(view)
                    ins[i] = host.to(self.device, non_blocking=True)
        self.run.release_inputs(job)
        job.event = torch.cuda.Event()
        job.event.record(self.copy_stream)

    def compute(self, job: Job) -> None:
        import torch

        self.compute_stream.wait_event(job.event)
        for ins in job.inputs:
            for x in ins:
                x.record_stream(self.compute_stream)
        results = self.finish(job, self.merge(job))
        buf, hosts = carve(self.run.out_pool, [(r.dtype, tuple(r.shape)) for r in results])
        job.out_bufs.append(buf)
        for host, r in zip(hosts, results):
            host.copy_(r, non_blocking=True)
        job.event = torch.cuda.Event()
        job.event.record(self.compute_stream)
        job.outputs.extend(hosts)

    def write(self, job: Job) -> None:
        if job.event is not None:
            job.event.synchronize()
        super().write(job)


class ReadAhead:
    """Keeps the disk busy ahead of the loader: one thread per input model walks that model's input bytes in
    job order and asks the kernel to read them (posix_fadvise WILLNEED, 8 MiB at a time, the size of a
    read request here), at most ``budget`` bytes (shared between the models) ahead of the job the loader
    is on. The models' reads are in flight together, as two ``cat``s are: the disk sees several sequential
    streams, each with requests queued, instead of one thread's tensor-after-tensor faults. Pages read
    ahead sit in the page cache (not in this process) until the loader maps them. The threads only hint:
    errors are ignored, and closing stops them.

    ``advance(idx)``: the loader starts job ``idx``. ``close()``: stop (the run ended or failed)."""

    CHUNK = 8 << 20

    def __init__(self, run: RunState, jobs: list[Job], budget: int):
        self.run, self.jobs, self.budget = run, jobs, budget
        self.current = -1
        self.closed = False
        self.cond = threading.Condition()
        self.threads: list[threading.Thread] = []
        self._started = False

    def _streams(self) -> dict[str, tuple[list, list[int]]]:
        """model -> ([(job index, reader, tensor name, nbytes)], bytes of that model before each job)."""
        per: dict[str, list] = {}
        for j, job in enumerate(self.jobs):
            if job.direct:
                continue  # read by DirectReads
            for t in job.tensors:
                for ref in t.inputs:
                    for f in ref.files:
                        src = self.run.plan.sources[ref.model]
                        per.setdefault(ref.model, []).append((j, ref, f, src.tensors[f].nbytes))
                    for other in ref.rows.sources if ref.rows is not None else ():
                        src = self.run.plan.sources[other.model]
                        per.setdefault(other.model, []).append(
                            (j, other, other.tensor, src.tensors[other.tensor].nbytes)
                        )
        out = {}
        for model, items in per.items():
            before = [0] * (len(self.jobs) + 1)
            for j, _, _, n in items:
                before[j + 1] += n
            for j in range(len(self.jobs)):
                before[j + 1] += before[j]
            out[model] = (items, before)
        return out

    def _start(self) -> None:
        self._started = True
        streams = self._streams()
        if not streams:
            return
        share = max(self.CHUNK, self.budget // len(streams))
        for items, before in streams.values():
            th = threading.Thread(
                target=self._walk, args=(items, before, share), name="mkf-read-ahead", daemon=True
            )
            th.start()
            self.threads.append(th)

    def _walk(self, items: list, before: list[int], share: int) -> None:
        pos = 0  # bytes of this model's inputs asked for so far
        for _, ref, name, nbytes in items:
            try:
                reader = self.run.reader(ref, name)
            except Exception:  # noqa: BLE001 - a hint: the loader reports real errors
                return
            ranged = getattr(reader, "willneed_range", None)
            lo = 0
            while lo < nbytes:
                n = min(self.CHUNK, nbytes - lo)
                with self.cond:
                    while (
                        not self.closed and pos + n > before[min(len(before) - 1, self.current + 1)] + share
                    ):
                        self.cond.wait()
                    if self.closed:
                        return
                with contextlib.suppress(Exception):
                    if ranged is not None:
                        ranged(name, lo, lo + n)
                    elif lo == 0:
                        reader.willneed(name)
                lo += n
                pos += n

    def advance(self, current: int) -> None:
        if not self._started:
            self._start()
        with self.cond:
            self.current = current
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for th in self.threads:
            th.join()
        self.threads.clear()


class Streamed(_TorchCompute):
    """One tensor too large for the memory budget, in chunks of the flattened tensor: for a two-pass
    method, a reduce pass over every chunk (the method's stream_reduce), then an apply pass that writes
    each chunk of the result at its offset in the shard (pwrite). Each chunk's input pages are mapped
    just before it is used and dropped right after, and one chunk buffer is reused, so resident memory
    stays near the budget whatever the tensor's size (a 47B MoE's 1.9 GB fused expert tensors included).
    Chunk boundaries fall on the method's ``stream_align`` (or rows) and on the boundaries of inputs
    made of parts, so that every piece of a chunk is one contiguous view of one file tensor."""

    def __init__(self, run: RunState, budget: int):
        super().__init__(run)
        self.budget = budget

    def load(self, job: Job) -> None:
        self.check_shapes(job.tensors[0])

    def _chunks(self, t: OutputTensor, method) -> list[tuple[int, int]]:
        n = math.prod(t.shape)
        align = t.shape[-1] if method.stream_rows and t.shape else max(1, method.stream_align)
        width = len(t.inputs) + 2  # inputs (cast), result, output cast
        itemsize = max(t.in_dtype.itemsize, t.out_dtype.itemsize, 4)
        target = max(align, self.budget // (width * itemsize) // align * align)
        cuts = {0, n}
        for ref in t.inputs:
            pos = 0
            for _, name in self.run.files(ref):
                pos += math.prod(self.run.plan.sources[ref.model].tensors[name].shape)
                cuts.add(pos)
        for s in range(0, n, target):
            cuts.add(s)
        bounds = sorted(c for c in cuts if c <= n)
        return list(zip(bounds[:-1], bounds[1:]))

    def _views(self, ref, lo: int, hi: int, dtype) -> tuple[list, object]:
        """The elements [lo, hi) of input ``ref`` (one contiguous view of one file tensor, cast to ``dtype``),
        with the callback that drops its pages."""
        pos = 0
        for reader, name in self.run.files(ref):
            info = self.run.plan.sources[ref.model].tensors[name]
            size = math.prod(info.shape)
            if pos <= lo and hi <= pos + size:
                item = info.dtype.itemsize
                a, b = (lo - pos) * item, (hi - pos) * item
                reader.prefault_range(name, a, b) if hasattr(reader, "prefault_range") else None
                view = reader.view(name).reshape(-1)[lo - pos : hi - pos]
                if view.device.type != "cpu":
                    view = view.cpu()
                x = view if view.dtype == dtype else view.to(dtype)
                release = (lambda r=reader, nm=name, a=a, b=b: r.release_range(nm, a, b)) if hasattr(
                    reader, "release_range") else (lambda: None)  # fmt: skip
                self.run.count_read(b - a)
                return x, release
            pos += size
        raise MergeError(f"{ref.tensor}: elements [{lo}, {hi}) span two of its parts")

    def compute(self, job: Job) -> None:
        import torch

        run = self.run
        t = job.tensors[0]
        method = job.method
        p = params(t)
        ctx = run.ctx(t)
        chunks = self._chunks(t, method)
        state = method.stream_begin(t, p, ctx)
        if method.stream_passes == 2:
            for lo, hi in chunks:
                pieces = [self._views(ref, lo, hi, t.in_dtype.torch) for ref in t.inputs]
                method.stream_reduce(state, [x for x, _ in pieces], lo, p, ctx)
                for _, release in pieces:
                    release()
            method.stream_between(state, p, ctx)
        longest = max((hi - lo for lo, hi in chunks), default=0)
        buf = run.out_pool.acquire(max(1, longest * t.in_dtype.itemsize))
        job.out_bufs.append(buf)
        writer = run.writers[t.name]
        finite = torch.ones((), dtype=torch.bool)
        out_item = t.out_dtype.itemsize
        try:
            for lo, hi in chunks:
                pieces = [self._views(ref, lo, hi, t.in_dtype.torch) for ref in t.inputs]
                out = as_bytes(buf)[: (hi - lo) * t.in_dtype.itemsize].view(t.in_dtype.torch)
                r = method.stream_apply(state, [x for x, _ in pieces], lo, p, ctx, out)
                for _, release in pieces:
                    release()
                if r.dtype != t.out_dtype:
                    r = r.to(t.out_dtype.torch)
                if r.is_floating_point():
                    finite &= all_finite(r.reshape(-1)[:1] if method.finite_probe == "first" else r)
                run.count_written(writer.write_at(t.name, lo * out_item, r))
        finally:
            run.finite_flags.append((t.name, finite))

    def write(self, job: Job) -> None:
        pass  # written chunk by chunk by compute
