"""The writer thread: PNG encoding and Redis writes, off the pass loop.

The pass loop hands tasks over and goes on with its next forward pass; the writer runs them in the
order given, so a job's images are stored before its terminal state. Two kinds of task:

* best-effort (progress, x0 previews): a Redis error skips it (logged, counted in
  edm_skipped_writes);
* must-succeed (finished images, terminal states): retried until they succeed or the worker stops.
  A job whose terminal state was never written stays in the worker's claimed list and goes back to
  its queue with it; the images it stored stay, so its rerun computes only the others.

At most `max_tasks` tasks wait; beyond that `put` blocks the pass loop (the time is counted in
edm_pass_loop_wait_seconds), which bounds the memory that a slow Redis can make the worker hold.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import redis

from worker.metrics import WorkerMetrics

log = logging.getLogger("worker.writer")


@dataclass(frozen=True)
class _Task:
    name: str
    run: Callable[[], None]
    must_succeed: bool
    ending: frozenset[str] = frozenset()  # ids whose terminal state this task writes


class Writer:
    def __init__(self, metrics: WorkerMetrics, max_tasks: int = 512, retry_s: float = 0.5):
        self.metrics = metrics
        self.retry_s = retry_s
        self._tasks: queue.Queue[_Task | None] = queue.Queue(max_tasks)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ending: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def best_effort(self, name: str, run: Callable[[], None]) -> None:
        self._put(_Task(name, run, must_succeed=False))

    def must(self, name: str, run: Callable[[], None], ending: Collection[str] = ()) -> None:
        ids = frozenset(ending)
        with self._lock:
            self._ending |= ids
        self._put(_Task(name, run, must_succeed=True, ending=ids))

    def ending(self) -> set[str]:
        """Ids whose terminal state is handed over but not written yet (never give these back)."""
        with self._lock:
            return set(self._ending)

    def backlog(self) -> int:
        return self._tasks.qsize()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every task handed over so far has run; False on timeout."""
        done = threading.Event()
        self._put(_Task("flush", done.set, must_succeed=False))
        return done.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        try:
            self._tasks.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)

    def _put(self, task: _Task) -> None:
        try:
            self._tasks.put_nowait(task)
        except queue.Full:
            started = time.perf_counter()
            self._tasks.put(task)
            self.metrics.loop_wait.inc(time.perf_counter() - started)

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            self._execute(task)
            if task.ending:
                with self._lock:
                    self._ending -= task.ending

    def _execute(self, task: _Task) -> None:
        while True:
            try:
                task.run()
                return
            except redis.RedisError as error:
                if not task.must_succeed:
                    self.metrics.skipped_writes.labels(task.name).inc()
                    log.warning("skipped a %s write: Redis failed (%s)", task.name, error)
                    return
                if self._stop.is_set():
                    log.warning("gave up a %s write at shutdown: %s", task.name, error)
                    return
                log.warning("%s write failed (%s); retrying", task.name, error)
                self._stop.wait(self.retry_s)
            except Exception:  # a bug: log it and keep the thread (and the other jobs' writes) alive
                log.exception("unexpected error in a %s write", task.name)
                return
