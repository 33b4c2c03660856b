"""The pipelined, memory-bounded executor: a MergePlan in, a finished model directory out.

    jobs.py      the plan's tensors grouped into jobs (raw copies, single tensors, batches of small
                 tensors), in input-file order; shard assignment
    buffers.py   the buffer pool that bounds memory (``--max-memory``)
    staging.py   how each job's bytes move: file-to-file copy, the native CPU kernel by address on
                 mapped memory, torch on mapped views, CUDA through pinned buffers and a copy stream
    pipeline.py  loader -> compute -> writer, threads and queues only
    output.py    where OUT may be, the temporary directory, the files beside the weights, atomic install

Memory is bounded by ``max_memory``: the buffer pool (outputs, and staged inputs on CUDA) never grows
past it, so peak memory does not grow with the model; a single tensor larger than the budget still
runs, alone. On the CPU a method with a native kernel and no dtype conversion runs by address, from
the mapped inputs straight into a shared mapping of the output shard: no output buffer, no copy, and
no torch (a CPU SLERP merge never imports it). Output is atomic and never touches an input
(``output``): everything is written into a hidden temporary directory beside OUT, installed only once
complete; a failure or a signal removes it, and a SIGKILL's leftover is removed by the next run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_fast import _native, backends, methods
from mergekit_fast.engine import output
from mergekit_fast.engine.buffers import BufferPool
from mergekit_fast.engine.jobs import Job, assign_shards, make_jobs, shard_names
from mergekit_fast.engine.pipeline import Pipeline
from mergekit_fast.engine.staging import (
    Copy,
    CpuDirect,
    CpuMapped,
    CpuNative,
    CudaPinned,
    DirectReads,
    Prefetch,
    ReadAhead,
    RunState,
    Strategy,
    Streamed,
)
from mergekit_fast.errors import MergeError
from mergekit_fast.io import direct
from mergekit_fast.io.safetensors import ShardWriter, itemsize
from mergekit_fast.ops import verify_requested
from mergekit_fast.plan import MergePlan

log = logging.getLogger("mergekit_fast")

__all__ = [
    "MergeError", "MergeOptions", "MergeResult", "Pipeline", "ShardLayout", "ShardStats", "no_progress",
    "resolve_device", "run_merge", "write_shards",
]  # fmt: skip


@dataclass
class MergeOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_shard_size: int = 5_000_000_000  # bytes, as mergekit (decimal 5B)
    max_memory: int = 4 << 30  # bytes of buffers in flight
    read_ahead: int = 512 << 20  # bytes of input asked to be read ahead (staging.ReadAhead)
    write_behind: int = 256 << 20  # bytes of output written back at most in flight (ShardWriter); 0: off
    direct_io: bool = True  # native CPU jobs move cold inputs and outputs by O_DIRECT (io/direct.py)
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
    peak_rss: int  # bytes: this process, or the largest of the workers (Ray) when larger
    shards: int
    verify_max_ulp: float | None = None
    nonfinite: list[str] = field(default_factory=list)
    random_seed: int | None = None  # the seed of the random draws (given, or drawn for this run)
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


def no_progress(n: int) -> None:
    """The progress callback of a run that shows no bar (an executor may skip reporting to it)."""


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


def _native_available(backend: str) -> bool:
    """Whether CPU tensors would run the native kernels (and no cross-check is asked for)."""
    if _native.C is None or verify_requested():
        return False
    try:
        return backends.select("merge", "cpu", backend) == "cpp"
    except (backends.BackendUnavailable, ValueError):
        return False  # the torch path raises it, if it matters


def _runs_natively(t, plan: MergePlan, writers: dict[str, ShardWriter]) -> bool:
    """The method's native CPU kernel runs this tensor on its inputs as stored: no dtype conversion."""
    method = methods.get(t.method)
    if method.native_cpu is None or not method.native_ok(t):
        return False
    if any(r.rows is not None for r in t.inputs):
        return False  # re-indexed rows (a vocabulary) are gathered by the torch path
    if t.in_dtype.native is None or not method.native_writes(t) or not writers[t.name].mappable:
        return False
    for r in t.inputs:
        src = plan.sources[r.model]
        if r.parts is not None:
            return False  # an input made of parts is assembled by the torch path
        info = src.tensors[r.tensor]
        if info.dtype != t.in_dtype or not src.reader(info.file).addressable(r.tensor):
            return False
    return True


def _direct_inputs(job, run) -> bool:
    """The job's inputs take direct reads: their files allow O_DIRECT, and at most half of their bytes
    are in the page cache (a direct read goes to the disk even for cached pages: a model read moments
    ago merges faster from memory)."""
    cached = total = 0.0
    for t in job.tensors:
        for ref in t.inputs:
            reader = run.reader(ref)
            if not hasattr(reader, "direct_fd") or reader.direct_fd() is None:
                return False
            nbytes = run.info(ref).nbytes
            total += nbytes
            cached += (reader.resident(ref.tensor) or 0.0) * nbytes
    return cached <= 0.5 * total


def _streams(t, plan: MergePlan, budget: int) -> bool:
    """A tensor whose inputs and result do not fit the memory budget runs in chunks, when its method can
    (``stream_passes``) and no input needs a gather (vocabulary rows)."""
    method = methods.get(t.method)
    if not method.stream_passes or any(r.rows is not None for r in t.inputs) or not t.inputs:
        return False
    numel = math.prod(t.shape)
    held = sum(_nbytes(plan, r) for r in t.inputs) + numel * max(t.in_dtype.itemsize, t.out_dtype.itemsize)
    return held > budget


def _nbytes(plan: MergePlan, ref) -> int:
    src = plan.sources[ref.model]
    return sum(src.tensors[f].nbytes for f in ref.files)


def _gathers(plan: MergePlan) -> bool:
    """Whether some input is staged in a buffer on the CPU: re-indexed vocabulary rows (gathered), or an
    MoE checkpoint's per-expert parts read as one fused tensor (assembled)."""
    return any(r.rows is not None or r.parts is not None for t in plan.tensors for r in t.inputs)


def _warn_small_budget(plan: MergePlan, opt: MergeOptions, cuda: bool) -> None:
    """Say what a --max-memory below one tensor's needs really uses (that tensor runs alone)."""
    budget = opt.max_memory // 2 if cuda or _gathers(plan) else opt.max_memory
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


def input_dirs(plan: MergePlan) -> list[str]:
    """The directories of every model the plan reads (what OUT must never touch)."""
    dirs = [str(src.path) for src in plan.sources.values() if getattr(src, "path", None) is not None]
    if plan.tokenizer_source is not None:  # tokenizer_source: a model that lends only its tokenizer
        dirs.append(str(plan.tokenizer_source))
    dirs.extend(str(d) for d in getattr(plan, "extra_inputs", ()))
    return dirs


def _execute(
    plan: MergePlan, writers: dict[str, ShardWriter], opt: MergeOptions, device, progress
) -> RunState:
    """Run every job of the plan through the pipeline; returns the run's counters and flags."""
    cuda = device != "cpu"
    # Inputs staged in buffers: always on CUDA, on the CPU only re-indexed (gathered) vocabulary rows.
    # Staged inputs and outputs each get half of the budget then.
    gathers = _gathers(plan)
    budget = opt.max_memory // 2 if cuda or gathers else opt.max_memory
    threads = opt.threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    in_pool = BufferPool(budget, pin=True) if cuda else BufferPool(budget) if gathers else None
    run = RunState(plan=plan, writers=writers, out_pool=BufferPool(budget, pin=cuda), in_pool=in_pool,
                   backend=opt.backend, threads=threads, seed=opt.random_seed, progress=progress)  # fmt: skip
    jobs = make_jobs(plan)
    copy = Copy(run)
    if cuda:
        compute: Strategy = CudaPinned(run, device)
        native = None
    else:
        compute = CpuMapped(run)
        native = CpuNative(run) if _native_available(opt.backend) else None
    streamed = Streamed(run, budget) if not cuda else None
    for job in jobs:
        job.streamed = streamed is not None and job.kind == "one" and _streams(job.tensors[0], plan, budget)
        job.native = (native is not None and job.kind != "copy" and not job.streamed
                      and all(_runs_natively(t, plan, writers) for t in job.tensors))  # fmt: skip
    if opt.direct_io and direct.supported():
        for job in jobs:
            job.direct = job.native and _direct_inputs(job, run)
    reads = None
    if any(j.direct for j in jobs):
        # direct jobs: their reads within three quarters of the memory budget, their outputs the rest
        reads = DirectReads(run, jobs, opt.read_ahead, cap=budget - budget // 4)
        native_direct = CpuDirect(run, reads, jobs, cap=budget // 4)
    if opt.threads and any(j.kind != "copy" and not j.native for j in jobs):
        import torch

        torch.set_num_threads(opt.threads)

    def strategy_of(job: Job) -> Strategy:
        if job.kind == "copy":
            return copy
        if job.direct:
            return native_direct
        return streamed if job.streamed else native if job.native else compute

    def abort() -> None:
        run.out_pool.close()
        if run.in_pool is not None:
            run.in_pool.close()
        if reads is not None:
            reads.stop()
            native_direct.out_pool.close()

    # On the CPU the loader prefaults inputs: one job ahead is enough overlap and keeps RSS bounded.
    prefetch = Prefetch(ReadAhead(run, jobs, opt.read_ahead), reads)
    Pipeline(strategy_of, prefetch, abort, load_depth=4 if cuda else 1).run(jobs)
    if reads is not None:
        log.info(
            "direct I/O: the compute waited %.2f s of its busy time for the reads", native_direct.read_wait
        )
    return run


@dataclass
class ShardLayout:
    """Which output shard every tensor goes to, fixed before any byte moves (mergekit's rule)."""

    names: list[str]  # shard file names, in order
    shards: list[list]  # the OutputTensors of each shard
    weight_map: dict[str, str]  # tensor name -> shard file name
    total: int  # bytes of all tensors

    @classmethod
    def of(cls, plan: MergePlan, shard_size: int) -> ShardLayout:
        shards = assign_shards(plan.tensors, shard_size)
        names = shard_names(len(shards))
        weight_map = {t.name: fname for fname, ts in zip(names, shards) for t in ts}
        total = sum(math.prod(t.shape) * itemsize(t.out_dtype) for t in plan.tensors)
        return cls(names, shards, weight_map, total)

    def nbytes(self, index: int) -> int:
        return sum(math.prod(t.shape) * itemsize(t.out_dtype) for t in self.shards[index])


@dataclass
class ShardStats:
    """What writing some shards moved, and which tensors came out non-finite."""

    bytes_read: int = 0
    bytes_written: int = 0
    nonfinite: list[str] = field(default_factory=list)
    peak_rss: int = 0  # the largest peak RSS of other processes that wrote shards (0: none did)

    def add(self, other: ShardStats) -> None:
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.nonfinite.extend(other.nonfinite)
        self.peak_rss = max(self.peak_rss, other.peak_rss)


def write_shards(plan: MergePlan, layout: ShardLayout, tmp: Path, opt: MergeOptions, device="cpu", *,
                 only=None, progress=None) -> ShardStats:  # fmt: skip
    """Write the shards numbered ``only`` (default: all) of ``layout`` into directory ``tmp``, complete and
    closed (a failure removes nothing but raises; the caller owns ``tmp``). The unit of work an executor
    hands out: shards are independent, and the same shard always gets the same bytes."""
    indices = list(range(len(layout.names))) if only is None else sorted(set(only))
    shard_writers: list[ShardWriter] = []
    writers: dict[str, ShardWriter] = {}
    try:
        for i in indices:
            fname, ts = layout.names[i], layout.shards[i]
            entries = [(t.name, t.out_dtype, tuple(t.shape)) for t in ts]
            try:
                w = ShardWriter(
                    tmp / fname, entries, metadata={"format": "pt"}, write_behind=opt.write_behind
                )
            except OSError as exc:
                raise MergeError(f"{tmp / fname}: cannot create the shard ({exc.strerror})") from None
            shard_writers.append(w)
            for t in ts:
                writers[t.name] = w
        part = (
            plan
            if only is None
            else dataclasses.replace(plan, tensors=[t for i in indices for t in layout.shards[i]])
        )
        run = _execute(part, writers, opt, device, progress or no_progress)
        for w in shard_writers:
            w.close(fsync=opt.fsync)
    except BaseException:
        for w in shard_writers:
            w.abort()
        raise
    return ShardStats(run.bytes_read, run.bytes_written, run.nonfinite)


def prepare_options(plan: MergePlan, opt: MergeOptions) -> MergeOptions:
    """The options as the run uses them: a random method without --random-seed gets a fresh seed,
    logged, so every merge can be repeated."""
    if opt.random_seed is None and any(methods.get(t.method).random for t in plan.tensors):
        import secrets

        opt = dataclasses.replace(opt, random_seed=secrets.randbits(63))
        log.warning("random seed %d (pass --random-seed %d to repeat this merge)", opt.random_seed,
                    opt.random_seed)  # fmt: skip
    return opt


def run_merge(
    plan: MergePlan,
    out_path: str | os.PathLike,
    options: MergeOptions | None = None,
    *,
    started: float | None = None,
    phases: dict[str, float] | None = None,
    executor=None,
) -> MergeResult:
    """Execute ``plan`` and write the merged model to ``out_path`` atomically.

    ``started`` (a time.perf_counter() value) is when the whole run began, so that the result's time
    covers planning and start-up; ``phases`` names the seconds spent before this call (plan, gates).
    ``executor`` writes the shards (``mergekit_fast.executors``; default: this process); everything
    else -- the checks, the temporary directory, the files beside the weights, --verify and the atomic
    install -- happens here.
    """
    from mergekit_fast.executors import LocalExecutor

    opt = prepare_options(plan, options or MergeOptions())
    executor = executor or LocalExecutor()
    t0 = time.perf_counter()
    started = t0 if started is None else started
    try:
        out = output.check_target(out_path, input_dirs(plan), force=opt.force,
                                  force_unrecognized=opt.force_unrecognized)  # fmt: skip
        # The executor says what the device means where it runs (a Ray cluster's GPUs, not this node's).
        device = getattr(executor, "resolve_device", resolve_device)(opt.device)
        output.check_tokenizer_files(plan, opt.copy_tokenizer)
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
    bar = None
    try:
        layout = ShardLayout.of(plan, opt.out_shard_size)
        show = opt.progress if opt.progress is not None else sys.stderr.isatty()
        if show:
            from tqdm import tqdm

            bar = tqdm(total=layout.total, unit="B", unit_scale=True, desc="merging", file=sys.stderr)
        stats = executor.write(plan, layout, tmp, opt, device, bar.update if bar else no_progress)
        nonfinite = stats.nonfinite
        if nonfinite:
            msg = f"{len(nonfinite)} merged tensor(s) contain NaN or Inf: {', '.join(nonfinite[:8])}"
            if opt.strict:
                raise MergeError(msg + " (--strict)")
            log.warning(msg)
        output.finalize_files(plan, tmp, layout.names, layout.weight_map, layout.total,
                              write_model_card=opt.write_model_card, copy_tokenizer=opt.copy_tokenizer)  # fmt: skip
        t_merged = time.perf_counter()
        verify_ulp = None
        if opt.verify:
            from mergekit_fast.verify import verify_output

            verify_ulp = verify_output(plan, tmp, opt.verify, seed=opt.random_seed)
        output.install(tmp, out)
    except BaseException:
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
        bytes_read=stats.bytes_read,
        bytes_written=stats.bytes_written,
        peak_rss=max(peak_rss_bytes(), stats.peak_rss),  # this process, or a worker's if larger
        shards=len(layout.names),
        verify_max_ulp=verify_ulp,
        nonfinite=nonfinite,
        phases=parts,
        random_seed=opt.random_seed,
    )
