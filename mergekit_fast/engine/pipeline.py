"""The pipeline: three stages joined by bounded queues, and error propagation. Nothing else.

  loader (thread)   walks the jobs in order, keeps the read-ahead going and calls each job's
                    ``strategy.load``;
  compute (caller)  ``strategy.compute``;
  writer (thread)   ``strategy.write`` then ``strategy.recycle``.

The first error (or KeyboardInterrupt) in any stage stops every stage: it is recorded, the buffer
pools are closed (waking any stage blocked on memory), the queues are drained, and the error is
raised in the caller once the threads have ended.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

from mergekit_fast.engine.jobs import Job
from mergekit_fast.engine.staging import ReadAhead, Strategy


class Pipeline:
    def __init__(self, strategy_of: Callable[[Job], Strategy], read_ahead: ReadAhead | None,
                 on_abort: Callable[[], None], load_depth: int = 1):  # fmt: skip
        self.strategy_of = strategy_of
        self.read_ahead = read_ahead
        self.on_abort = on_abort  # wakes stages waiting for memory (closes the pools)
        self.load_depth = load_depth
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def _fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
        self.on_abort()

    def _loader(self, jobs: list[Job], out_q: queue.Queue) -> None:
        try:
            for idx, job in enumerate(jobs):
                if self.error is not None:
                    break
                if self.read_ahead is not None:
                    self.read_ahead.advance(idx)
                self.strategy_of(job).load(job)
                out_q.put(job)
        except BaseException as exc:  # noqa: BLE001 - forwarded to the caller
            self._fail(exc)
        finally:
            out_q.put(None)

    def _writer(self, in_q: queue.Queue) -> None:
        try:
            while True:
                job = in_q.get()
                if job is None:
                    return
                strategy = self.strategy_of(job)
                if self.error is None:
                    strategy.write(job)
                strategy.recycle(job)
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
        try:
            while True:
                job = load_q.get()
                if job is None:
                    break
                if self.error is None:
                    try:
                        self.strategy_of(job).compute(job)
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
            self.on_abort()
        if self.error is not None:
            raise self.error
