"""Units of pipeline work, and which output shard each tensor goes to.

A job is a raw copy (the output is an input's bytes), one tensor, or a batch of small tensors of one
method (``batch_max_numel``). Jobs are ordered by where their first input lies on disk, so the inputs
are read front to back. Which jobs run natively (by address, without torch) is the pipeline's call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mergekit_fast import methods
from mergekit_fast.io.safetensors import itemsize
from mergekit_fast.plan import MergePlan, OutputTensor

# Small tensors of a batching method are merged in batches of at most this many tensors / bytes.
BATCH_MAX_TENSORS = 256
BATCH_MAX_BYTES = 64 << 20


@dataclass
class Job:
    """One unit of pipeline work: a raw copy, one tensor, or a batch of small tensors of one method."""

    kind: str  # "copy" | "one" | "<method>_batch"
    tensors: list[OutputTensor]
    key: tuple = ()
    native: bool = False  # run by the method's native CPU kernel, by address, into the output mapping
    direct: bool = False  # native, with its inputs and output moved by direct I/O (staging.CpuDirect)
    streamed: bool = False  # too large for the budget: in chunks (staging.Streamed)
    # filled by the loader / compute stages
    inputs: list = field(default_factory=list)  # per tensor: input tensors (native: addresses)
    targets: list = field(default_factory=list)  # native: per tensor, its address in the output mapping
    staged: list = field(default_factory=list)  # pool buffers holding staged inputs (CUDA)
    event: object = None
    outputs: list = field(default_factory=list)  # per tensor: host tensor to write (native: none)
    out_bufs: list = field(default_factory=list)  # pool buffers holding outputs
    reserved: int = 0  # bytes of outputs held outside the pool, accounted in it
    direct_bufs: list = field(default_factory=list)  # (pool, buffer) of inputs read by direct I/O
    placed: list = field(default_factory=list)  # direct: where each tensor starts in out_bufs[0]

    @property
    def method(self) -> methods.MergeMethod:
        return methods.get(self.tensors[0].method)


def params(t: OutputTensor) -> dict:
    return dict(t.params)


def is_raw_copy(t: OutputTensor, sources) -> bool:
    """The method copies the inputs' bytes and no dtype changes: the engine copies file to file."""
    if not t.inputs or not methods.get(t.method).copies_bytes(params(t)):
        return False
    if any(r.rows is not None for r in t.inputs):
        return False  # re-indexed rows (a vocabulary) are gathered, not copied
    return all(
        sources[r.model].tensors[f].dtype == t.in_dtype == t.out_dtype for r in t.inputs for f in r.files
    )


def make_jobs(plan: MergePlan) -> list[Job]:
    """Group the plan's tensors into jobs, ordered by where their inputs lie on disk."""

    def key(t: OutputTensor) -> tuple:
        if not t.inputs:  # a constant
            return ("", 0)
        info = plan.sources[t.inputs[0].model].tensors[t.inputs[0].files[0]]
        return (str(info.file), info.start)

    singles: list[Job] = []
    small: dict[str, list[OutputTensor]] = {}
    for t in plan.tensors:
        m = methods.get(t.method)
        if is_raw_copy(t, plan.sources):
            singles.append(Job("copy", [t], key(t)))
        elif m.batch_max_numel and math.prod(t.shape) <= m.batch_max_numel:
            small.setdefault(t.method, []).append(t)
        else:
            singles.append(Job("one", [t], key(t)))
    batches: list[Job] = []
    for name, ts in small.items():
        ts.sort(key=key)
        cur: list[OutputTensor] = []
        cur_bytes = 0
        for t in ts:
            nbytes = math.prod(t.shape) * itemsize(t.in_dtype)
            if cur and (len(cur) >= BATCH_MAX_TENSORS or cur_bytes + nbytes > BATCH_MAX_BYTES):
                batches.append(Job(f"{name}_batch", cur, key(cur[0])))
                cur, cur_bytes = [], 0
            cur.append(t)
            cur_bytes += nbytes
        if cur:
            batches.append(Job(f"{name}_batch", cur, key(cur[0])))
    jobs = singles + batches
    jobs.sort(key=lambda j: j.key)
    return jobs


def assign_shards(tensors: list[OutputTensor], max_bytes: int) -> list[list[OutputTensor]]:
    """Split output tensors (in order) into shards like mergekit: a new shard starts when the next
    tensor would push the current one past ``max_bytes``."""
    shards: list[list[OutputTensor]] = [[]]
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
