"""``--executor ray``: a merge plan's shards written by Ray tasks, on one machine or across a cluster.

What runs where:

  driver   (this process) plans, checks OUT, creates the temporary directory beside OUT, splits the
           shards into groups balanced by bytes (``assign_by_bytes``), puts the plan into Ray's object
           store once, starts one task per group, shows one progress bar over every worker's bytes, then
           writes the index, config and tokenizer files, runs --verify and installs OUT atomically;
  task     (a Ray worker, one GPU each where the cluster has GPUs, else one CPU slot) checks that it
           can read its inputs and see the temporary directory, then runs the engine's pipeline
           (``engine.write_shards``) for its shards, at the same absolute paths: inputs and OUT must be
           on storage every node shares.

A task whose worker dies (a crash, a lost node, a SIGKILL) is retried by Ray (``max_retries``); the
retry writes its shards from scratch (``ShardWriter`` truncates). A task that raises (an unreadable
input, a full disk) is not retried: its error, prefixed with the worker's node, fails the merge, the
other tasks are stopped, and nothing is left at OUT. The driver stops tasks by a mark in the temporary
directory (``CANCEL_MARK``), which every task checks as it writes, and ``ray.cancel``s only a task
that has not ended after ``STOP_GRACE_S``: Ray's cancel races with a task that is just ending, and
that race aborts the driver process (ray-project/ray#54798, still seen with Ray 2.60). The driver
never rebuilds anything a worker decides: the plan, the shard layout, the device and the random seed
(``engine.prepare_options``) are fixed before any task starts, so a shard's bytes are the same
whichever worker writes it.

``run_many`` runs whole independent merges as Ray tasks (``mergekit-fast merge-many``), one GPU or CPU
slot each: every merge is planned and written by its task with the local executor, exactly as a single
``mergekit-fast merge`` of that config.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import ray

from mergekit_fast.engine import ShardStats, no_progress
from mergekit_fast.errors import MergeError
from mergekit_fast.executors import _Executor, assign_by_bytes

log = logging.getLogger("mergekit_fast")

# How often (seconds) a worker reports its bytes, and the driver polls them.
REPORT_INTERVAL = 0.25
# How long the driver waits for cancelled tasks to end before it removes the temporary directory.
CANCEL_WAIT_S = 30.0
# The file in the temporary directory that tells the tasks to stop, and how long they get to see it
# before the driver cancels the rest through Ray.
CANCEL_MARK = ".cancel"
STOP_GRACE_S = 10.0
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def node_name() -> str:
    """This node as messages name it: its Ray IP address and host name."""
    return f"{ray.util.get_node_ip_address()} ({socket.gethostname()})"


# ----------------------------------------------------------------------------- the connection


def connect(address: str | None) -> bool:
    """Connect this process to Ray (unless it already is); True when this call started the connection.
    ``address``: a cluster's address (``ray start --head`` prints it), ``auto``, or None (Ray's own rule:
    $RAY_ADDRESS, else the cluster last started on this machine, else a new local one)."""
    if ray.is_initialized():
        return False
    # ray.init installs its own SIGTERM handler (sys.exit): keep the CLI's, which unwind the merge and
    # exit 128 + the signal's number with nothing at OUT.
    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in _SIGNALS} if main else {}
    try:
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=False,
                 include_dashboard=False if address is None else None)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"--ray-address {address}" if address else "Ray"
        raise MergeError(f"{where}: cannot connect to the Ray cluster ({exc})") from None
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
    log.info("connected to Ray at %s", ray.get_runtime_context().gcs_address)
    return True


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def alive_nodes() -> int:
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


def _task_resources(gpu: bool) -> dict:
    return {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}


def _device_for(device: str, gpus: int) -> str:
    """What --device means on the cluster's workers: "cuda" (each task gets one GPU) or "cpu"."""
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda:"):
        raise MergeError(
            f"--device {device}: on Ray every worker gets its own GPU; use --device cuda or auto"
        )
    if device not in ("auto", "cuda"):
        raise MergeError(f"--device {device}: only cpu and cuda are supported")
    if gpus:
        return "cuda"
    if device == "cuda":
        raise MergeError("--device cuda: the Ray cluster has no GPUs")
    return "cpu"


# ----------------------------------------------------------------------------- on the workers


def _register(shipped: dict) -> None:
    """Make every merge method of the plan available in this worker: a method registered by a module the
    worker has not imported (the MoE builder's, a script's) travels with the plan."""
    from mergekit_fast import methods

    for name, method in shipped.items():
        try:
            methods.get(name)
        except KeyError:
            methods.register(method)


def _check_visible(plan, tensors, tmp: Path) -> None:
    """Every input file these tensors read, and the temporary directory, as this worker sees them (the
    caller names the node)."""
    files = sorted({str(plan.sources[r.model].tensors[r.tensor].file) for t in tensors for r in t.inputs
                    if getattr(plan.sources[r.model], "path", None) is not None})  # fmt: skip
    for f in files:
        try:
            with open(f, "rb"):
                pass
        except OSError as exc:
            raise MergeError(
                f"{f}: cannot read this input here ({exc.strerror}); every worker must see the inputs at "
                "the same absolute paths as the driver (storage all nodes share)"
            ) from None
    if not tmp.is_dir():
        raise MergeError(
            f"{tmp}: the output's temporary directory does not exist here; OUT must be on storage every "
            "node shares, at the same path"
        )


class _Stopped(Exception):
    """The driver asked this task to stop (``CANCEL_MARK``): another task failed, or the driver was
    interrupted."""


class _Reporter:
    """The engine's progress callback in a worker, called as bytes are written: at most every
    REPORT_INTERVAL seconds it checks the driver's stop mark (raising ``_Stopped``, which unwinds the
    engine like any write error) and sends the bytes this attempt has written to the driver's progress
    actor, if there is one (a retry starts a new attempt)."""

    def __init__(self, actor, task: tuple, tmp: Path):
        self.actor, self.task = actor, task
        self.mark = tmp / CANCEL_MARK
        self.attempt = uuid.uuid4().hex
        self.total = 0
        self.sent = 0.0
        self.lock = threading.Lock()

    def check(self) -> None:
        if self.mark.exists():
            raise _Stopped(f"{self.mark}: stopped by the driver")

    def __call__(self, n: int) -> None:
        with self.lock:
            self.total += n
            now = time.monotonic()
            if now - self.sent < REPORT_INTERVAL:
                return
            self.sent = now
            total = self.total
        self.check()
        if self.actor is not None:
            self.actor.report.remote(self.task, self.attempt, total)

    def flush(self) -> None:
        if self.actor is not None:
            ray.get(self.actor.report.remote(self.task, self.attempt, self.total))


def _worker_error(exc: BaseException, node: str) -> MergeError:
    what = str(exc) if isinstance(exc, (MergeError, OSError, ValueError)) else f"{type(exc).__name__}: {exc}"
    return MergeError(f"worker on node {node}: {what}")


@ray.remote
def _write_shards_task(payload, indices: list[int], device: str, tmp: str, opt, task: tuple, actor, shipped):
    """One group of shards, written by the engine's pipeline on this worker (device "cuda": the GPU Ray
    assigned to this task)."""
    from mergekit_fast.engine import peak_rss_bytes, resolve_device, write_shards

    plan, layout = payload
    node = node_name()
    try:
        _register(shipped)
        _check_visible(plan, [t for i in indices for t in layout.shards[i]], Path(tmp))
        reporter = _Reporter(actor, task, Path(tmp))
        reporter.check()  # a retry, or a task that started late, after the driver asked them to stop
        stats = write_shards(plan, layout, Path(tmp), opt, resolve_device(device), only=indices,
                             progress=reporter)  # fmt: skip
        reporter.flush()
        # The worker's peak RSS (over its process's life: Ray reuses workers, so an upper bound).
        stats.peak_rss = peak_rss_bytes()
        return stats
    except MergeError as exc:
        if str(exc).startswith("worker on node "):
            raise
        raise _worker_error(exc, node) from None
    except _Stopped:
        raise
    except Exception as exc:  # noqa: BLE001 - named with the node, raised on the driver
        raise _worker_error(exc, node) from None
    finally:
        for src in plan.sources.values():
            src.close()


@ray.remote(num_cpus=0)
class _Progress:
    """Bytes written per task of each run, by the task's latest attempt (a retried task starts again
    from zero). A task is (run id, task index); one actor serves every run of an executor."""

    def __init__(self):
        self.done: dict[str, dict[int, tuple[str, int]]] = {}

    def report(self, task: tuple, attempt: str, total: int) -> None:
        run, index = task
        self.done.setdefault(run, {})[index] = (attempt, total)

    def total(self, run: str) -> int:
        return sum(n for _, n in self.done.get(run, {}).values())

    def forget(self, run: str) -> None:
        self.done.pop(run, None)


# ----------------------------------------------------------------------------- on the driver


def _raise_from(exc: BaseException) -> None:
    """A task's failure as the driver reports it (MergeError: exit 2 on the command line)."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and not isinstance(cause, ray.exceptions.RayError):
            raise MergeError(str(cause)) from None
    if isinstance(exc, ray.exceptions.RayError):
        raise MergeError(f"a Ray task failed: {type(exc).__name__}: {exc}") from None
    raise exc


def _wait(refs: list, timeout: float) -> list:
    """The tasks of ``refs`` that have not ended within ``timeout`` seconds."""
    try:
        return ray.wait(refs, num_returns=len(refs), timeout=timeout)[1]
    except Exception:  # noqa: BLE001 - the connection is gone
        return []


def _cancel(refs: list, tmp: Path | None = None) -> None:
    """Stop every task that has not ended and wait (bounded) until they have, so that none writes into
    the temporary directory after the driver removed it. With ``tmp``, the tasks are asked first, by
    the stop mark, and only those still running after STOP_GRACE_S are cancelled through Ray."""
    pending = _wait(refs, 0)
    if tmp is not None and pending:
        try:
            (tmp / CANCEL_MARK).touch()
        except OSError:
            pass
        pending = _wait(pending, STOP_GRACE_S)
    for r in pending:
        try:
            ray.cancel(r, force=True)
        except Exception:  # noqa: BLE001 - an already finished task
            pass
    _wait(pending, CANCEL_WAIT_S)


def _methods_of(plan) -> dict:
    from mergekit_fast import methods

    return {name: methods.get(name) for name in sorted({t.method for t in plan.tensors})}


class RayExecutor(_Executor):
    """Output shards written by Ray tasks. ``address``: the cluster (None: Ray's default rule; see
    ``connect``); ``workers``: how many tasks (default: one per GPU of the cluster, else one per node);
    ``max_retries``: Ray's retries of a task whose worker died. A connection this executor started is
    closed by ``close()`` (an existing one, e.g. the caller's ``ray.init``, is left open)."""

    def __init__(self, address: str | None = None, workers: int | None = None, max_retries: int = 3):
        if workers is not None and workers < 1:
            raise MergeError(f"--workers must be at least 1, got {workers}")
        self.address = address
        self.workers = workers
        self.max_retries = max_retries
        self._started = False
        self._gpu = False
        self._progress = None  # the progress actor, started on the first run that shows a bar

    def _connect(self) -> None:
        if connect(self.address):
            self._started = True

    def close(self) -> None:
        if self._progress is not None:
            try:
                ray.kill(self._progress)
            except Exception:  # noqa: BLE001 - the connection is gone; the actor went with it
                pass
            self._progress = None
        if self._started:
            self._started = False
            ray.shutdown()

    def resolve_device(self, device: str) -> str:
        self._connect()
        resolved = _device_for(device, cluster_gpus())
        self._gpu = resolved == "cuda"
        return resolved

    def worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        return cluster_gpus() if self._gpu else alive_nodes()

    def write(self, plan, layout, tmp, options, device, progress):
        self._connect()
        if device != "cpu":
            device = "cuda"
            self._gpu = True
        n = self.worker_count()
        groups = assign_by_bytes([layout.nbytes(i) for i in range(len(layout.names))], n)
        if not groups:
            return ShardStats()
        if self.workers is not None and len(groups) < self.workers:
            log.warning("%d workers asked for but only %d output shards: %d tasks run (a smaller "
                        "--out-shard-size gives more shards)", self.workers, len(groups), len(groups))  # fmt: skip
        for src in plan.sources.values():
            path = getattr(src, "path", None)
            if path is not None and not os.path.isabs(path):
                raise MergeError(f"{path}: a model path must be absolute for Ray workers to find it")
        # Progress: the workers report their bytes to one actor that the driver polls (no bar, no actor).
        actor = None
        if progress is not no_progress:
            if self._progress is None:
                self._progress = _Progress.remote()
            actor = self._progress
        run = uuid.uuid4().hex
        payload = ray.put((plan, layout))
        shipped = _methods_of(plan)
        task = _write_shards_task.options(max_retries=self.max_retries, scheduling_strategy="SPREAD",
                                          **_task_resources(self._gpu))  # fmt: skip
        refs = [
            task.remote(payload, g, device, str(tmp), options, (run, i), actor, shipped)
            for i, g in enumerate(groups)
        ]
        stats = ShardStats()
        shown = 0
        try:
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=REPORT_INTERVAL)
                for r in done:
                    try:
                        stats.add(ray.get(r))
                    except ray.exceptions.RayError as exc:
                        _raise_from(exc)
                if actor is not None:
                    total = ray.get(actor.total.remote(run))
                    if total != shown:
                        progress(total - shown)
                        shown = total
        except BaseException:
            _cancel(refs, Path(tmp))
            raise
        finally:
            if actor is not None:
                actor.forget.remote(run)
        return stats


# ----------------------------------------------------------------------------- many merges


@ray.remote
def _merge_task(source, base_dir: str, out: str, opt):
    """One whole merge (plan, shards, install) on a worker, as ``mergekit-fast merge`` would run it."""
    from mergekit_fast.config import parse_config
    from mergekit_fast.engine import run_merge
    from mergekit_fast.plan import build_plan

    node = node_name()
    t0 = time.perf_counter()
    try:
        config = parse_config(source, base_dir=base_dir)
        plan = build_plan(config, allow_crimes=opt.allow_crimes, trust_remote_code=opt.trust_remote_code)
        return run_merge(plan, out, opt, started=t0, phases={"plan": time.perf_counter() - t0})
    except Exception as exc:  # noqa: BLE001 - named with the node, returned to the driver
        raise _worker_error(exc, node) from None


def run_many(jobs: list[tuple], opt, *, address: str | None = None, max_retries: int = 3,
             on_result=None) -> list:  # fmt: skip
    """Run independent merges as Ray tasks. ``jobs``: (config source (YAML text or dict), base_dir, out)
    each; returns, in order, each merge's MergeResult or the MergeError it failed with. ``on_result(i,
    result)`` is called as each one ends."""
    started = connect(address)
    opt = dataclasses.replace(opt, progress=False)  # a worker's bar would only garble the driver's output
    try:
        gpu = _device_for(opt.device, cluster_gpus()) == "cuda"
        task = _merge_task.options(max_retries=max_retries, **_task_resources(gpu))
        refs = [task.remote(src, base_dir, str(out), opt) for src, base_dir, out in jobs]
        index = {r: i for i, r in enumerate(refs)}
        results: list = [None] * len(refs)
        try:
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for r in done:
                    i = index[r]
                    try:
                        results[i] = ray.get(r)
                    except ray.exceptions.RayError as exc:
                        try:
                            _raise_from(exc)
                        except MergeError as err:
                            results[i] = err
                    if on_result is not None:
                        on_result(i, results[i])
        except BaseException:
            _cancel(refs)
            raise
        return results
    finally:
        if started:
            ray.shutdown()
