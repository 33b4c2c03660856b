"""The pipeline: three stages joined by bounded queues, and error propagation. Nothing else.

  loader (thread)   walks the jobs in order, keeps the read-ahead going and calls each job's
                    ``strategy.load``;
  compute (caller)  ``strategy.compute``;
  writer (thread)   ``strategy.write`` then ``strategy.recycle``.

Each stage's busy time (its strategy calls) and the time it waited on its neighbours (an empty input
queue, a full output queue) are kept in ``stages`` and logged at INFO (``-v``): which stage bounds
the run.

The first error (or KeyboardInterrupt) in any stage stops every stage: it is recorded, the buffer
pools are closed (waking any stage blocked on memory), the queues are drained, and the error is
raised in the caller once the threads have ended.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

from mergekit_fast.engine.jobs import Job
from mergekit_fast.engine.staging import Prefetch, Strategy

log = logging.getLogger("mergekit_fast")


class Pipeline:
    def __init__(self, strategy_of: Callable[[Job], Strategy], read_ahead: Prefetch | None,
                 on_abort: Callable[[], None], load_depth: int = 1):  # fmt: skip
        self.strategy_of = strategy_of
        self.read_ahead = read_ahead
        self.on_abort = on_abort  # wakes stages waiting for memory (closes the pools)
        self.load_depth = load_depth
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        # stage -> [busy seconds, seconds waiting for the previous stage, seconds waiting for the next]
        self.stages = {"load": [0.0, 0.0, 0.0], "compute": [0.0, 0.0, 0.0], "write": [0.0, 0.0, 0.0]}

    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
        self.on_abort()

    def _loader(self, jobs: list[Job], out_q: queue.Queue) -> None:
        st = self.stages["load"]
        try:
            for idx, job in enumerate(jobs):
                if self.error is not None:
                    break
                t0 = time.perf_counter()
                if self.read_ahead is not None:
                    self.read_ahead.advance(idx)
                self.strategy_of(job).load(job)
                t1 = time.perf_counter()
                out_q.put(job)
                st[0] += t1 - t0
                st[2] += time.perf_counter() - t1
        except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
            self._fail(exc)
        finally:
            out_q.put(None)

    def _writer(self, in_q: queue.Queue) -> None:
        st = self.stages["write"]
        try:
            while True:
                t0 = time.perf_counter()
                job = in_q.get()
                t1 = time.perf_counter()
                st[1] += t1 - t0
                if job is None:
                    return
                strategy = self.strategy_of(job)
                if self.error is None:
                    strategy.write(job)
                strategy.recycle(job)
                st[0] += time.perf_counter() - t1
        except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
            self._fail(exc)
            # Keep draining so the producer never blocks on a full queue.
            while (job := in_q.get()) is not None:
                with contextlib.suppress(BaseException):
                    self.strategy_of(job).recycle(job)

    def run(self, jobs: list[Job]) -> None:
        load_q: queue.Queue = queue.Queue(maxsize=self.load_depth)
        write_q: queue.Queue = queue.Queue(maxsize=8)
        lt = threading.Thread(target=self._loader, args=(jobs, load_q), name="mkf-loader", daemon=True)
        wt = threading.Thread(target=self._writer, args=(write_q,), name="mkf-writer", daemon=True)
        lt.start()
        wt.start()
        st = self.stages["compute"]
        try:
            while True:
                t0 = time.perf_counter()
                job = load_q.get()
                t1 = time.perf_counter()
                st[1] += t1 - t0
                if job is None:
                    break
                if self.error is None:
                    try:
                        self.strategy_of(job).compute(job)
                    except BaseException as exc:
                        self._fail(exc)
                t2 = time.perf_counter()
                write_q.put(job)
                st[0] += t2 - t1
                st[2] += time.perf_counter() - t2
        except BaseException as exc:  # KeyboardInterrupt included
            self._fail(exc)
            while lt.is_alive():
                with contextlib.suppress(queue.Empty):
                    load_q.get(timeout=0.05)
        finally:
            write_q.put(None)
            lt.join()
            if self.read_ahead is not None:
                self.read_ahead.close()
            wt.join()
            self.on_abort()
        if self.error is not None:
            raise self.error
        log.info("pipeline: %s", "; ".join(
            f"{name} busy {b:.2f} s, waited {w_in:.2f} s for input, {w_out:.2f} s for room"
            for name, (b, w_in, w_out) in self.stages.items()))  # fmt: skip
