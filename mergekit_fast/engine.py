"""The pipelined, memory-bounded executor: a MergePlan in, a finished model directory out.

Three stages run at once, joined by bounded queues:

  loader (thread)   walks the work in input-file order; asks the kernel to read ahead
                    (posix_fadvise WILLNEED) and hands out zero-copy views of the mapped inputs;
                    on CUDA it also stages them into pinned buffers and starts the host-to-device
                    copies on a copy stream.
  compute (caller)  runs the merge methods (SLERP batched across small tensors) into output
                    buffers, casts to the output dtype; on CUDA it starts the device-to-host copy.
  writer (thread)   writes every tensor at its offset in its (preallocated) shard, releases the
                    input pages and returns the buffers to the pool.

On the CPU, SLERP with no dtype conversion runs the native kernel by address, from the mapped
inputs straight into a shared mapping of the output shard (the loader maps both one job ahead; the
writer then only drops the pages): no output buffer, no copy, and no torch -- such a merge never
imports it (2 s of a small merge). Everything else goes through torch (imported when first needed).

Memory is bounded by ``max_memory``: the buffer pool (outputs, and staged inputs on CUDA) never
grows past it, so peak memory does not grow with the model. A single tensor larger than the
budget still runs, alone. Passthrough tensors whose dtype does not change are copied file to file
(copy_file_range) without being decoded.

Output is atomic and never touches an input (``mergekit_fast.output``): everything is written into a
hidden temporary directory beside OUT, installed only once complete. A failure or a signal removes the
temporary directory; a SIGKILL leaves only that hidden directory (never OUT), which the next run
writing in the same directory cleans up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import queue
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_fast import _native, backends, dtypes, output
from mergekit_fast.errors import MergeError
from mergekit_fast.io.model import ModelSource
from mergekit_fast.io.safetensors import ShardWriter, itemsize
from mergekit_fast.ops import SLERP_DOT_THRESHOLD, SLERP_EPS, check_slerp_t, verify_requested
from mergekit_fast.ops import SLERP_SEGMENT_MAX_NUMEL as SEGMENT_MAX_NUMEL

log = logging.getLogger("mergekit_fast")

# Small SLERP tensors are merged in batches of at most this many tensors / bytes.
BATCH_MAX_TENSORS = 256
BATCH_MAX_BYTES = 64 << 20


@dataclass
class MergeOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_shard_size: int = 5_000_000_000  # bytes, as mergekit (decimal 5B)
    max_memory: int = 4 << 30  # bytes of buffers in flight
    read_ahead: int = 512 << 20  # bytes of input asked to be read ahead
    copy_tokenizer: bool = True
    write_model_card: bool = True
    force: bool = False  # replace an existing OUT that looks like a merge output
    force_unrecognized: bool = False  # ... or anything else at OUT (never an input model)
    random_seed: int | None = None  # seed of the random draws (mergekit's --random-seed)
    allow_crimes: bool = False  # mix architectures (mergekit's --allow-crimes)
    trust_remote_code: bool = False  # passed to transformers where it loads a config or a model
    backend: str = "auto"
    verify: int = 0  # number of sampled tensors to cross-check (-1: all)
    progress: bool | None = None  # None: only on a terminal
    strict: bool = False  # non-finite values in a merged tensor are an error instead of a warning
    fsync: bool = False
    threads: int = 0  # CPU threads for the kernels (0: every core this process may use)


@dataclass
class MergeResult:
    out_path: Path
    seconds: float
    tensors: int
    bytes_read: int
    bytes_written: int
    peak_rss: int
    shards: int
    verify_max_ulp: float | None = None
    nonfinite: list[str] = field(default_factory=list)
    # seconds per phase (plan, gates, merge, verify); ``seconds`` is the whole run, start-up included
    phases: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        merge_s = self.phases.get("merge", self.seconds)
        gbps = (self.bytes_read + self.bytes_written) / max(merge_s, 1e-9) / 1e9
        other = self.seconds - sum(self.phases.values())
        parts = ([f"start-up {other:.2f} s"] if other >= 0.005 and self.phases else []) + [
            f"{k} {v:.2f} s" for k, v in self.phases.items()
        ]
        s = (
            f"merged {self.tensors} tensors into {self.out_path} in {self.seconds:.2f} s"
            + (f" ({', '.join(parts)})" if parts else "")
            + f": read {self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e9:.2f} GB "
            f"({gbps:.2f} GB/s while merging), peak RSS {self.peak_rss / 2**30:.2f} GiB"
        )
        if self.verify_max_ulp is not None:
            s += f", verify max error {self.verify_max_ulp:.2f} ulp"
        return s


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _nvidia_absent() -> bool:
    """True when this machine certainly has no NVIDIA GPU (no driver device node): then "auto" is
    the CPU without importing torch to ask."""
    return not os.path.exists("/dev/nvidiactl") and "torch" not in sys.modules


def resolve_device(device: str):
    """ "cpu", or the torch.device of a visible GPU."""
    if device == "cpu" or (device == "auto" and _nvidia_absent()):
        return "cpu"
    import torch

    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"--device {device}: no CUDA GPU is visible")
    if dev.type not in ("cpu", "cuda"):
        raise MergeError(f"--device {device}: only cpu and cuda are supported")
    return "cpu" if dev.type == "cpu" else dev


# ----------------------------------------------------------------------------- shards


def assign_shards(tensors, max_bytes: int) -> list[list]:
    """Split output tensors (in order) into shards like mergekit: a new shard starts when the next
    tensor would push the current one past ``max_bytes``."""
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * itemsize(t.out_dtype)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards if shards[0] else []


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# ----------------------------------------------------------------------------- buffers


class BufferPool:
    """Reusable byte buffers under a byte budget: anonymous memory maps, or pinned torch tensors
    for CUDA staging; ``len(buf)`` is a buffer's size.

    Reusing buffers avoids the page faults of fresh large allocations; the budget bounds memory.
    A request larger than the whole budget is served alone, once everything else is returned.
    """

    def __init__(self, budget: int, pin: bool = False):
        self.budget = budget
        self.pin = pin
        self.free: list = []
        self.in_use = 0
        self.held = 0  # bytes allocated (free + in use)
        self.cond = threading.Condition()
        self.closed = False

    def _alloc(self, nbytes: int):
        if not self.pin:
            return mmap.mmap(-1, nbytes)  # page-aligned, zero pages until first written
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def acquire(self, nbytes: int):
        nbytes = max(nbytes, 1)
        with self.cond:
            while True:
                if self.closed:
                    raise MergeError("merge aborted")
                best = None
                for i, buf in enumerate(self.free):
                    if len(buf) >= nbytes and (best is None or len(buf) < len(self.free[best])):
                        best = i
                if best is not None:
                    buf = self.free.pop(best)
                    self.in_use += len(buf)
                    return buf
                # Drop free buffers that are too small, to make room under the budget.
                while self.free and self.held + nbytes > self.budget:
                    self.held -= len(self.free.pop(0))
                if self.held + nbytes <= self.budget or self.in_use == 0:
                    self.held += nbytes
                    self.in_use += nbytes
                    return self._alloc(nbytes)
                self.cond.wait()

    def reserve(self, nbytes: int) -> None:
        """Account for ``nbytes`` held outside the pool (an output torch allocated), waiting for room."""
        with self.cond:
            while True:
                if self.closed:
                    raise MergeError("merge aborted")
                while self.free and self.held + nbytes > self.budget:
                    self.held -= len(self.free.pop(0))
                if self.held + nbytes <= self.budget or self.in_use == 0:
                    self.held += nbytes
                    self.in_use += nbytes
                    return
                self.cond.wait()

    def unreserve(self, nbytes: int) -> None:
        with self.cond:
            self.held -= nbytes
            self.in_use -= nbytes
            self.cond.notify_all()

    def release(self, buf) -> None:
        with self.cond:
            self.in_use -= len(buf)
            if self.held <= self.budget:
                self.free.append(buf)
            else:
                self.held -= len(buf)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.free.clear()
            self.cond.notify_all()


def _bytes(buf):
    """A pool buffer as a flat uint8 torch tensor (zero-copy)."""
    import torch

    return buf if isinstance(buf, torch.Tensor) else torch.frombuffer(buf, dtype=torch.uint8)


def _all_finite(x):
    """0-d bool tensor: no NaN or Inf in ``x``. min/max propagate NaN and expose +-Inf, and one
    aminmax pass is ~10x faster on the CPU than isfinite(x).all() for 16-bit tensors."""
    import torch

    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    lo, hi = torch.aminmax(x)
    return torch.isfinite(lo) & torch.isfinite(hi)


def _carve(pool: BufferPool, specs: list[tuple]) -> tuple[object, list]:
    """One pool buffer holding torch tensors of the given (dtype, shape), each 64-byte aligned."""
    offsets, total = [], 0
    specs = [(dtypes.of(d), tuple(s)) for d, s in specs]
    for d, s in specs:
        offsets.append(total)
        total += -(-(math.prod(s) * d.itemsize) // 64) * 64
    buf = pool.acquire(total)
    flat = _bytes(buf)
    views = [
        flat[off : off + math.prod(s) * d.itemsize].view(d.torch).view(s)
        for off, (d, s) in zip(offsets, specs)
    ]
    return buf, views


# ----------------------------------------------------------------------------- work items


@dataclass
class Job:
    """One unit of pipeline work: a raw copy, one tensor, or a batch of small SLERP tensors."""

    kind: str  # "copy" | "one" | "slerp_batch"
    tensors: list  # OutputTensor
    key: tuple = ()
    native: bool = False  # SLERP by the native CPU kernel, by address, into the output shard's mapping
    # filled by the loader / compute stages
    inputs: list = field(default_factory=list)  # per tensor: input tensors (native: addresses)
    targets: list = field(default_factory=list)  # native: per tensor, its address in the output mapping
    staged: list = field(default_factory=list)  # pool buffers holding staged inputs (CUDA)
    event: object = None
    outputs: list = field(default_factory=list)  # per tensor: host tensor to write (native: none)
    out_bufs: list = field(default_factory=list)  # pool buffers holding outputs
    reserved: int = 0  # bytes of outputs held outside the pool, accounted in it


def _params(t) -> dict:
    return dict(t.params)


# Methods whose inputs have the output's shape (checked when loading). Others (the MoE builder's) check
# their inputs' shapes when they are planned.
SAME_SHAPE_METHODS = frozenset({"slerp", "linear", "passthrough"})


def _is_raw_copy(t, sources) -> bool:
    """passthrough without scale, or concat (the inputs' bytes one after another), with no dtype change."""
    if t.method not in ("passthrough", "concat") or _params(t).get("scale") is not None or not t.inputs:
        return False
    return all(sources[r.model].tensors[r.tensor].dtype == t.in_dtype == t.out_dtype for r in t.inputs)


def make_jobs(plan) -> list[Job]:
    """Group the plan's tensors into jobs, ordered by where their inputs lie on disk."""

    def key(t):
        if not t.inputs:  # a constant
            return ("", 0)
        info = plan.sources[t.inputs[0].model].tensors[t.inputs[0].tensor]
        return (str(info.file), info.start)

    singles, small = [], []
    for t in plan.tensors:
        if _is_raw_copy(t, plan.sources):
            singles.append(Job("copy", [t], key(t)))
        elif t.method == "slerp" and math.prod(t.shape) <= SEGMENT_MAX_NUMEL:
            small.append(t)
        else:
            singles.append(Job("one", [t], key(t)))
    small.sort(key=key)
    batches, cur, cur_bytes = [], [], 0
    for t in small:
        nbytes = math.prod(t.shape) * itemsize(t.in_dtype)
        if cur and (len(cur) >= BATCH_MAX_TENSORS or cur_bytes + nbytes > BATCH_MAX_BYTES):
            batches.append(Job("slerp_batch", cur, key(cur[0])))
            cur, cur_bytes = [], 0
        cur.append(t)
        cur_bytes += nbytes
    if cur:
        batches.append(Job("slerp_batch", cur, key(cur[0])))
    jobs = singles + batches
    jobs.sort(key=lambda j: j.key)
    return jobs


# ----------------------------------------------------------------------------- the executor


def _native_slerp_available(backend: str) -> bool:
    """Whether SLERP on CPU tensors would run the native kernel (and no cross-check is asked for)."""
    if _native.C is None or verify_requested():
        return False
    try:
        return backends.select("slerp", "cpu", backend) == "cpp"
    except (backends.BackendUnavailable, ValueError):
        return False  # the torch path raises it, if a SLERP is planned at all


class _Pipeline:
    def __init__(self, plan, writers: dict[str, tuple[ShardWriter, object]], options: MergeOptions,
                 device, progress: Callable[[int], None]):  # fmt: skip
        self.plan = plan
        self.writers = writers  # output name -> (ShardWriter, shard index)
        self.opt = options
        self.device = device  # "cpu" or a CUDA torch.device
        self.cuda = device != "cpu"
        self.native_slerp = not self.cuda and _native_slerp_available(options.backend)
        self.threads = options.threads or (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
        self._torch_ready = False
        self.progress = progress
        # Separate pools for staged inputs (CUDA) and outputs, and one acquire per job and pool:
        # a job never waits on buffers that it, or a job queued behind it, holds.
        budget = options.max_memory // 2 if self.cuda else options.max_memory
        self.out_pool = BufferPool(budget, pin=self.cuda)
        self.in_pool = BufferPool(budget, pin=True) if self.cuda else None
        self.error: BaseException | None = None
        self.bytes_read = 0
        self.bytes_written = 0
        self.finite_flags: list[tuple[str, object]] = []  # (name, bool or 0-d bool tensor)
        self.lock = threading.Lock()
        if self.cuda:
            import torch

            self.copy_stream = torch.cuda.Stream(device)
            self.compute_stream = torch.cuda.current_stream(device)

    def _is_native(self, t) -> bool:
        """SLERP that the native CPU kernel runs on the inputs as stored: no dtype conversion."""
        if (
            not self.native_slerp
            or t.method != "slerp"
            or t.in_dtype.native is None
            or t.out_dtype != t.in_dtype
            or not self.writers[t.name][0].mappable
        ):
            return False
        return all(self.plan.sources[r.model].tensors[r.tensor].dtype == t.in_dtype for r in t.inputs)

    def _torch(self):
        """torch, imported on first use, with the thread count asked for."""
        import torch

        if not self._torch_ready:
            if self.opt.threads:
                torch.set_num_threads(self.opt.threads)
            self._torch_ready = True
        return torch

    # -- helpers
    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
        self._close_pools()

    # -- stage 1: loader
    def _advise(self, jobs: list[Job], start: int, budget: int) -> int:
        """posix_fadvise(WILLNEED) the inputs of jobs[start:] up to ``budget`` bytes; returns the next index."""
        i, total = start, 0
        while i < len(jobs) and total < budget:
            for t in jobs[i].tensors:
                for ref in t.inputs:
                    src = self.plan.sources[ref.model]
                    info = src.tensors[ref.tensor]
                    reader = src.reader(info.file)
                    with contextlib.suppress(OSError, AttributeError):
                        os.posix_fadvise(
                            reader._file.fileno(), info.start, info.nbytes, os.POSIX_FADV_WILLNEED
                        )
                    total += info.nbytes
            i += 1
        return i

    def loader(self, jobs: list[Job], out_q: queue.Queue) -> None:
        try:
            advised = self._advise(jobs, 0, self.opt.read_ahead)
            for idx, job in enumerate(jobs):
                if self.error is not None:
                    break
                if advised <= idx + 1:
                    advised = self._advise(jobs, advised, self.opt.read_ahead)
                if job.kind != "copy":
                    self._load(job)
                out_q.put(job)
        except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
            self._fail(exc)
        finally:
            out_q.put(None)

    def _close_pools(self) -> None:
        self.out_pool.close()
        if self.in_pool is not None:
            self.in_pool.close()

    def _load(self, job: Job) -> None:
        views = []
        for t in job.tensors:
            ins = []
            for ref in t.inputs:
                src: ModelSource = self.plan.sources[ref.model]
                info = src.tensors[ref.tensor]
                if t.method in SAME_SHAPE_METHODS and tuple(info.shape) != tuple(t.shape):
                    raise MergeError(
                        f"{info.file}: tensor {ref.tensor!r} has shape {tuple(info.shape)}, expected {tuple(t.shape)}"
                    )
                reader = src.reader(info.file)
                view = reader.address(ref.tensor) if job.native else reader.view(ref.tensor)
                with self.lock:
                    self.bytes_read += info.nbytes
                if not self.cuda:
                    # Fault the pages in here, on the loader thread, while compute works on the previous job.
                    reader.prefault(ref.tensor)
                ins.append(view)
                views.append(view)
            job.inputs.append(ins)
            if job.native:  # map (and zero) the output's pages here too
                job.targets.append(self.writers[t.name][0].target(t.name))
        if not self.cuda:
            return
        torch = self._torch()
        # Stage every input of the job through one pinned buffer, then copy to the device.
        buf, staged = _carve(self.in_pool, [(v.dtype, tuple(v.shape)) for v in views])
        job.staged.append(buf)
        it = iter(staged)
        with torch.cuda.stream(self.copy_stream):
            for ins in job.inputs:
                for i, view in enumerate(ins):
                    host = next(it)
                    host.copy_(view)
                    ins[i] = host.to(self.device, non_blocking=True)
        self._release_inputs(job)
        job.event = torch.cuda.Event()
        job.event.record(self.copy_stream)

    # -- stage 2: compute
    def compute(self, job: Job) -> None:
        if job.kind == "copy":
            return
        if job.native:
            self._compute_native(job)
            return
        torch = self._torch()
        if self.cuda:
            self.compute_stream.wait_event(job.event)
            for ins in job.inputs:
                for x in ins:
                    x.record_stream(self.compute_stream)
        results = []
        for t, r in zip(job.tensors, self._merge(job)):
            if r.dtype != t.out_dtype:
                r = r.to(t.out_dtype.torch)
            if r.is_floating_point():
                # A 0-d tensor: on CUDA it is read once at the end, so no sync here.
                # SLERP: a NaN/Inf input makes the coefficients, hence every element, NaN, so
                # one element tells; the other methods get a full pass.
                probe = r.reshape(-1)[:1] if t.method == "slerp" else r
                self.finite_flags.append((t.name, _all_finite(probe)))
            results.append(r)
        if self.cuda:
            buf, hosts = _carve(self.out_pool, [(r.dtype, tuple(r.shape)) for r in results])
            job.out_bufs.append(buf)
            for host, r in zip(hosts, results):
                host.copy_(r, non_blocking=True)
            results = hosts
            job.event = torch.cuda.Event()
            job.event.record(self.compute_stream)
        else:
            # The inputs are no longer needed: drop their pages now, not when the job is written.
            self._release_inputs(job)
            pooled = {_bytes(b).data_ptr() for b in job.out_bufs}
            extra = sum(r.nbytes for r in results if r.untyped_storage().data_ptr() not in pooled)
            if extra:
                self.out_pool.reserve(extra)
                job.reserved = extra
        job.outputs.extend(results)

    def _compute_native(self, job: Job) -> None:
        """SLERP by the native kernel, from the mapped inputs into the mapped output shard."""
        ts = job.tensors
        job.reserved = sum(math.prod(t.shape) * t.in_dtype.itemsize for t in ts)
        self.out_pool.reserve(job.reserved)  # pages in flight until the writer drops them
        by_dtype: dict[object, list[int]] = {}
        for i, t in enumerate(ts):
            by_dtype.setdefault(t.in_dtype, []).append(i)
        for d, idx in by_dtype.items():
            _native.slerp_cpu_many(
                d.native, [check_slerp_t(_params(ts[i])["t"], f"t of {ts[i].name}") for i in idx], [job.inputs[i][0] for i in idx],
                [job.inputs[i][1] for i in idx], [job.targets[i] for i in idx],
                [math.prod(ts[i].shape) for i in idx], SLERP_EPS, SLERP_DOT_THRESHOLD, self.threads,
            )  # fmt: skip
        self._release_inputs(job)
        for t in ts:
            # A NaN/Inf input makes the coefficients, hence every element, NaN: one element tells.
            first = self.writers[t.name][0].peek(t.name, t.in_dtype.itemsize)
            self.finite_flags.append((t.name, not first or t.in_dtype.first_is_finite(first)))

    def _merge(self, job: Job) -> list:
        from mergekit_fast import methods

        casted = [
            [x if x.dtype == t.in_dtype else x.to(t.in_dtype.torch) for x in ins]
            for t, ins in zip(job.tensors, job.inputs)
        ]
        if job.kind == "slerp_batch" or job.tensors[0].method == "slerp":
            outs = None
            if not self.cuda:
                # Outputs straight into pooled buffers: no fresh allocations, no page faults.
                buf, outs = _carve(self.out_pool, [(t.in_dtype, tuple(t.shape)) for t in job.tensors])
                job.out_bufs.append(buf)
            return methods.slerp_many(
                [_params(t)["t"] for t in job.tensors], [c[0] for c in casted], [c[1] for c in casted],
                backend=self.opt.backend, outs=outs,
            )  # fmt: skip
        t = job.tensors[0]
        return [methods.apply(t.method, casted[0], _params(t))]

    # -- stage 3: writer
    def writer(self, in_q: queue.Queue) -> None:
        try:
            while True:
                job = in_q.get()
                if job is None:
                    return
                if self.error is not None:
                    self._recycle(job)
                    continue
                if job.event is not None and job.kind != "copy":
                    job.event.synchronize()
                for i, t in enumerate(job.tensors):
                    shard, _ = self.writers[t.name]
                    if job.kind == "copy":
                        n = self._copy_raw(t, shard)
                    elif job.native:
                        n = shard.commit(t.name)
                    else:
                        n = shard.write(t.name, job.outputs[i])
                    with self.lock:
                        self.bytes_written += n
                    self.progress(n)
                self._recycle(job)
        except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
            self._fail(exc)
            # Keep draining so the producer never blocks on a full queue.
            while in_q.get() is not None:
                pass

    def _copy_raw(self, t, shard: ShardWriter) -> int:
        """Copy the inputs' bytes, one after another, into the output's range (file to file)."""
        start, end = shard.offsets[t.name]
        pos = start
        views = []
        for ref in t.inputs:
            src = self.plan.sources[ref.model]
            info = src.tensors[ref.tensor]
            reader = src.reader(info.file)
            views.append((reader, ref.tensor, info))
            if pos + info.nbytes > end:
                raise MergeError(f"{t.name}: the inputs hold more bytes than the output's {end - start}")
            pos += info.nbytes
        if pos != end:
            raise MergeError(f"{t.name}: the inputs hold {pos - start} bytes, the output needs {end - start}")
        try:
            pos = start
            for reader, _, info in views:
                in_fd = reader._file.fileno()
                done = 0
                while done < info.nbytes:
                    k = os.copy_file_range(
                        in_fd, shard._fd, info.nbytes - done, info.start + done, pos + done
                    )
                    if k == 0:
                        raise OSError("copy_file_range copied nothing")
                    done += k
                pos += info.nbytes
        except (OSError, AttributeError):
            import torch

            if len(views) == 1:
                shard.write(t.name, views[0][0].view(views[0][1]))
            else:
                shard.write(
                    t.name, torch.cat([r.view(name).reshape(-1) for r, name, _ in views]).view(t.shape)
                )
        else:
            shard.written.add(t.name)
        for reader, name, _ in views:
            reader.release(name)
        with self.lock:
            self.bytes_read += end - start
        return end - start

    def _release_inputs(self, job: Job) -> None:
        for t in job.tensors:
            for ref in t.inputs:
                src = self.plan.sources[ref.model]
                info = src.tensors[ref.tensor]
                src.reader(info.file).release(ref.tensor)

    def _recycle(self, job: Job) -> None:
        self._release_inputs(job)
        if job.reserved:
            self.out_pool.unreserve(job.reserved)
            job.reserved = 0
        for buf in job.staged:
            self.in_pool.release(buf)
        for buf in job.out_bufs:
            self.out_pool.release(buf)
        job.inputs.clear()
        job.targets.clear()
        job.outputs.clear()
        job.staged.clear()
        job.out_bufs.clear()

    @property
    def nonfinite(self) -> list[str]:
        return [name for name, ok in self.finite_flags if not bool(ok)]

    def run(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.native = job.kind != "copy" and all(self._is_native(t) for t in job.tensors)
        # On the CPU the loader prefaults inputs: one job ahead is enough overlap and keeps RSS bounded.
        load_q: queue.Queue = queue.Queue(maxsize=4 if self.cuda else 1)
        write_q: queue.Queue = queue.Queue(maxsize=8)
        lt = threading.Thread(target=self.loader, args=(jobs, load_q), name="mkf-loader", daemon=True)
        wt = threading.Thread(target=self.writer, args=(write_q,), name="mkf-writer", daemon=True)
        lt.start()
        wt.start()
        try:
            while True:
                job = load_q.get()
                if job is None:
                    break
                if self.error is None:
                    try:
                        self.compute(job)
                    except BaseException as exc:
                        self._fail(exc)
                write_q.put(job)
        except BaseException as exc:  # KeyboardInterrupt included
            self._fail(exc)
            while lt.is_alive():
                with contextlib.suppress(queue.Empty):
                    load_q.get(timeout=0.05)
        finally:
            write_q.put(None)
            lt.join()
            wt.join()
            self._close_pools()
        if self.error is not None:
            raise self.error


# ----------------------------------------------------------------------------- output directory


def model_card(plan) -> str:
    models = "\n".join(f"* {name}" for name in plan.sources)
    methods_used = sorted({t.method for t in plan.tensors})
    return (
        "---\nlibrary_name: transformers\ntags:\n- mergekit\n- mergekit_fast\n- merge\n---\n"
        "# merged model\n\n"
        "This is a merge of pre-trained language models created with "
        "[mergekit_fast](https://github.com/) (mergekit-compatible).\n\n"
        f"## Merge details\n\nMerge method(s): {', '.join(methods_used)}\n\n"
        f"### Models merged\n\n{models}\n\n"
        f"### Configuration\n\n```yaml\n{plan.config_yaml.strip()}\n```\n"
    )


def _check_tokenizer_files(plan, opt: MergeOptions) -> None:
    """Every tokenizer file the output will copy can be read: a broken symlink or a file without read
    permission is an error now, before any work, never a silently missing tokenizer."""
    if not opt.copy_tokenizer or plan.tokenizer_source is None:
        return
    src = Path(plan.tokenizer_source)
    for name in output.TOKENIZER_FILES:
        path = src / name
        if not os.path.lexists(path):
            continue
        if not path.exists():
            raise MergeError(f"{path}: tokenizer file is a broken symlink (to {os.readlink(path)})")
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise MergeError(f"{path}: cannot read the tokenizer file ({exc.strerror})") from None


def _finalize_files(plan, tmp: Path, shard_files: list[str], weight_map: dict, total: int, opt: MergeOptions):
    if len(shard_files) > 1:
        index = {"metadata": {"total_size": total, "mergekit_version": "0.1.5"}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    if opt.write_model_card:
        # A plan may bring its own card and config file name (the MoE builder: mergekit_moe_config.yml).
        (tmp / "README.md").write_text(getattr(plan, "model_card", None) or model_card(plan))
        (tmp / getattr(plan, "config_file_name", "mergekit_config.yml")).write_text(plan.config_yaml)
    if opt.copy_tokenizer and plan.tokenizer_source is not None:
        src = Path(plan.tokenizer_source)
        for name in output.TOKENIZER_FILES:
            if os.path.lexists(src / name):
                try:
                    shutil.copyfile(src / name, tmp / name)
                except OSError as exc:
                    raise MergeError(
                        f"{src / name}: cannot copy the tokenizer file ({exc.strerror})"
                    ) from None


def _warn_small_budget(plan, opt: MergeOptions, cuda: bool) -> None:
    """Say what a --max-memory below one tensor's needs really uses (that tensor runs alone)."""
    budget = opt.max_memory // 2 if cuda else opt.max_memory
    big = max(plan.tensors, key=lambda t: math.prod(t.shape) * max(t.in_dtype.itemsize, t.out_dtype.itemsize),
              default=None)  # fmt: skip
    if big is None:
        return
    need = math.prod(big.shape) * max(big.in_dtype.itemsize, big.out_dtype.itemsize)
    if need > budget:
        log.warning(
            "--max-memory %s is below what the largest tensor needs (%s: %s of buffers%s); such tensors run "
            "one at a time, so about %s is used instead",
            _mib(opt.max_memory), big.name, _mib(need), ", per pool on CUDA" if cuda else "", _mib(need),
        )  # fmt: skip


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def input_dirs(plan) -> list[str]:
    """The directories of every model the plan reads (what OUT must never touch)."""
    dirs = [str(src.path) for src in plan.sources.values() if getattr(src, "path", None) is not None]
    if plan.tokenizer_source is not None:  # tokenizer_source: a model that lends only its tokenizer
        dirs.append(str(plan.tokenizer_source))
    return dirs


def run_merge(
    plan,
    out_path: str | os.PathLike,
    options: MergeOptions | None = None,
    *,
    started: float | None = None,
    phases: dict[str, float] | None = None,
) -> MergeResult:
    """Execute ``plan`` and write the merged model to ``out_path`` atomically.

    ``started`` (a time.perf_counter() value) is when the whole run began, so that the result's time
    covers planning and start-up; ``phases`` names the seconds spent before this call (plan, gates).
    """
    opt = options or MergeOptions()
    t0 = time.perf_counter()
    started = t0 if started is None else started
    try:
        out = output.check_target(out_path, input_dirs(plan), force=opt.force,
                                  force_unrecognized=opt.force_unrecognized)  # fmt: skip
        device = resolve_device(opt.device)
        _check_tokenizer_files(plan, opt)
        _warn_small_budget(plan, opt, device != "cpu")
    except BaseException:
        for src in plan.sources.values():
            src.close()
        raise
    output.clean_stale(out.parent)
    tmp = output.tmp_dir_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as exc:
        for src in plan.sources.values():
            src.close()
        raise MergeError(f"{out.parent}: cannot create the output there ({exc.strerror})") from None
    writers: list[ShardWriter] = []
    bar = None
    try:
        shards = assign_shards(plan.tensors, opt.out_shard_size)
        names = shard_names(len(shards))
        by_name: dict[str, tuple[ShardWriter, int]] = {}
        weight_map: dict[str, str] = {}
        total = 0
        for i, (fname, ts) in enumerate(zip(names, shards)):
            entries = [(t.name, t.out_dtype, tuple(t.shape)) for t in ts]
            try:
                w = ShardWriter(tmp / fname, entries, metadata={"format": "pt"})
            except OSError as exc:
                raise MergeError(f"{tmp / fname}: cannot create the shard ({exc.strerror})") from None
            writers.append(w)
            for t in ts:
                by_name[t.name] = (w, i)
                weight_map[t.name] = fname
                total += math.prod(t.shape) * itemsize(t.out_dtype)
        show = opt.progress if opt.progress is not None else sys.stderr.isatty()
        if show:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="merging", file=sys.stderr)
        jobs = make_jobs(plan)
        pipe = _Pipeline(plan, by_name, opt, device, bar.update if bar else (lambda n: None))
        pipe.run(jobs)
        for w in writers:
            w.close(fsync=opt.fsync)
        nonfinite = pipe.nonfinite
        if nonfinite:
            msg = f"{len(nonfinite)} merged tensor(s) contain NaN or Inf: {', '.join(nonfinite[:8])}"
            if opt.strict:
                raise MergeError(msg + " (--strict)")
            log.warning(msg)
        _finalize_files(plan, tmp, names, weight_map, total, opt)
        t_merged = time.perf_counter()
        verify_ulp = None
        if opt.verify:
            from mergekit_fast.verify import verify_output

            verify_ulp = verify_output(plan, tmp, opt.verify)
        output.install(tmp, out)
    except BaseException:
        for w in writers:
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        for src in plan.sources.values():
            src.close()
    end = time.perf_counter()
    parts = dict(phases or {})
    parts["merge"] = t_merged - t0
    if opt.verify:
        parts["verify"] = end - t_merged
    return MergeResult(
        out_path=out,
        seconds=end - started,
        tensors=len(plan.tensors),
        bytes_read=pipe.bytes_read,
        bytes_written=pipe.bytes_written,
        peak_rss=peak_rss_bytes(),
        shards=len(names),
        verify_max_ulp=verify_ulp,
        nonfinite=nonfinite,
        phases=parts,
    )
