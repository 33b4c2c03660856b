"""Where a plan's shards get written: this process (the default), every GPU of this node, or a Ray cluster.

An executor has one required method, ``write(plan, layout, tmp, options, device, progress) -> ShardStats``:
it writes every shard of ``layout`` (``mergekit_fast.engine.ShardLayout``) into the directory ``tmp``,
complete and closed, and returns what was moved; ``progress(n)`` is called with the bytes written
(a negative ``n`` takes back bytes a retried worker writes again). It may also define
``resolve_device(name)``: what ``write`` gets as ``device`` for the ``--device`` value ``name`` (default:
``engine.resolve_device``, a device of this process). The driver (``engine.run_merge``) does everything
else: the checks, the temporary directory, the index and config, --verify and the atomic install. The
plan knows every output tensor and its shard before any byte moves, so shards are independent units
of work, and a shard's bytes do not depend on who writes it.

    LocalExecutor      every shard in this process (the default)
    MultiGPUExecutor   ``--multi-gpu``: one worker thread per visible GPU, each writing its share
    RayExecutor        ``--executor ray`` (``executors/ray.py``, imported only when asked for)

``assign_by_bytes`` is how a multi-worker executor splits the shards: balanced by bytes, the same
split every time. Executors that hold resources (a Ray connection) are context managers; ``close()``
releases them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading

from mergekit_fast.errors import MergeError

log = logging.getLogger("mergekit_fast")

__all__ = ["EXECUTORS", "LocalExecutor", "MultiGPUExecutor", "assign_by_bytes", "make_executor",
           "ray_missing_message", "require_ray"]  # fmt: skip

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'mergekit_fast[ray]'"


class _Executor:
    def resolve_device(self, device: str):
        from mergekit_fast.engine import resolve_device

        return resolve_device(device)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class LocalExecutor(_Executor):
    """Every shard in this process, through the engine's pipeline."""

    def write(self, plan, layout, tmp, options, device, progress):
        from mergekit_fast.engine import write_shards

        return write_shards(plan, layout, tmp, options, device, progress=progress)


def assign_by_bytes(sizes: list[int], workers: int) -> list[list[int]]:
    """Split shards (their byte sizes, in order) among at most ``workers`` workers, balanced by bytes:
    the largest shard first, each to the worker with the fewest bytes so far (ties: the lower worker);
    deterministic. Returns each worker's shard indices, ascending; no worker gets nothing."""
    n = max(1, min(workers, len(sizes)))
    groups: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        w = min(range(n), key=lambda k: (load[k], k))
        groups[w].append(i)
        load[w] += sizes[i]
    return [sorted(g) for g in groups if g]


class _Cancelled(MergeError):
    """Raised inside a worker thread once another worker failed or the run was interrupted."""


class MultiGPUExecutor(_Executor):
    """``--multi-gpu``: the shards split by bytes across the visible GPUs (``workers``: at most that
    many), one thread per GPU running the engine's pipeline on device ``cuda:i`` for its shards.
    ``--max-memory`` bounds each worker's buffers. Without a visible GPU, one worker on the CPU (the
    local executor). A failure or an interruption stops the other workers at their next tensor."""

    def __init__(self, workers: int | None = None):
        if workers is not None and workers < 1:
            raise MergeError(f"--workers must be at least 1, got {workers}")
        self.workers = workers

    def resolve_device(self, device: str):
        if device.startswith("cuda:"):
            raise MergeError(
                f"--multi-gpu uses every visible GPU, not --device {device}; choose the GPUs with "
                "CUDA_VISIBLE_DEVICES (and their number with --workers)"
            )
        return super().resolve_device(device)

    def gpus(self, device) -> list:
        """The devices the workers run on."""
        if device == "cpu":
            return ["cpu"]
        import torch

        n = torch.cuda.device_count()
        if self.workers is not None:
            n = min(n, self.workers)
        return [torch.device("cuda", i) for i in range(max(n, 1))]

    def write(self, plan, layout, tmp, options, device, progress):
        from mergekit_fast.engine import ShardStats, write_shards

        devices = self.gpus(device)
        groups = assign_by_bytes([layout.nbytes(i) for i in range(len(layout.names))], len(devices))
        if len(groups) <= 1:
            return LocalExecutor().write(plan, layout, tmp, options, devices[0], progress)
        if len(groups) < len(devices):
            log.warning("%d GPUs but only %d output shards: %d workers run (a smaller --out-shard-size "
                        "gives more shards)", len(devices), len(groups), len(groups))  # fmt: skip
        stop = threading.Event()
        lock = threading.Lock()

        def report(n: int) -> None:
            if stop.is_set():
                raise _Cancelled("merge cancelled")
            with lock:
                progress(n)

        stats = ShardStats()
        with concurrent.futures.ThreadPoolExecutor(len(groups), thread_name_prefix="mkf-gpu") as pool:
            futures = [pool.submit(write_shards, plan, layout, tmp, options, dev, only=g, progress=report)
                       for dev, g in zip(devices, groups)]  # fmt: skip
            try:
                pending = set(futures)
                while pending:
                    done, pending = concurrent.futures.wait(pending, timeout=0.2,
                                                            return_when=concurrent.futures.FIRST_EXCEPTION)  # fmt: skip
                    if any(f.exception() is not None for f in done):
                        break
            except BaseException:
                stop.set()  # a signal: the workers stop at their next tensor, the pool's exit waits for them
                raise
            # One worker failed: the others stop at their next tensor, and the pool's exit waits for them,
            # so nothing writes into the temporary directory once the driver removes it.
            if pending:
                stop.set()
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
        for f in futures:
            stats.add(f.result())
        return stats


def ray_missing_message() -> str:
    return f"--executor ray needs Ray, which is not installed; install it with: {RAY_INSTALL}"


def require_ray() -> None:
    """Ray imports, or a MergeError says how to install it."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise MergeError(ray_missing_message()) from None


def make_executor(name: str | None = None, *, multi_gpu: bool = False, ray_address: str | None = None,
                  workers: int | None = None):  # fmt: skip
    """The executor for ``name`` (local | ray; None: local), or the multi-GPU one. Ray is imported only
    here, and only for ``ray``; without it the error says how to install it."""
    name = name or "local"
    if name not in EXECUTORS:
        raise MergeError(f"unknown executor {name!r}; choose one of: {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise MergeError(f"--workers must be at least 1, got {workers}")
    if name == "ray":
        if multi_gpu:
            raise MergeError("--multi-gpu runs on one node without Ray; with --executor ray every GPU of the "
                             "cluster is used already")  # fmt: skip
        require_ray()
        from mergekit_fast.executors.ray import RayExecutor

        return RayExecutor(address=ray_address, workers=workers)
    if ray_address is not None:
        raise MergeError("--ray-address goes with --executor ray")
    if multi_gpu:
        return MultiGPUExecutor(workers)
    if workers is not None:
        raise MergeError("--workers goes with --executor ray or --multi-gpu")
    return LocalExecutor()
