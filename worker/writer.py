"""The writer thread: PNG encoding and Redis writes, off the pass loop.

The pass loop hands tasks over and goes on with its next forward pass; the writer runs them in the
order given, so a job's images are stored before its terminal state. Two kinds of task:

* best-effort (progress, x0 previews): a Redis error skips it (logged, counted in
  edm_skipped_writes);
* must-succeed (finished images, terminal states): retried until they succeed or the worker stops.
  A job whose terminal state was never written stays in the worker's claimed list and goes back to
  its queue with it; the images it stored stay, so its rerun computes only the others.

Consecutive tasks of one kind are merged: the writer hands their items to one call (one pipeline or
transaction for many jobs' images, or terminal states), so a burst of jobs ending together costs a
few round trips, not one per job.

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
from typing import Any

import redis

from worker.metrics import WorkerMetrics

log = logging.getLogger("worker.writer")


@dataclass(frozen=True)
class _Task:
    name: str
    run: Callable[[list[Any]], None]     # called with the items of every merged task
    items: tuple[Any, ...]
    must_succeed: bool
    ending: frozenset[str] = frozenset()  # ids whose terminal state this task writes


class Writer:
    def __init__(self, metrics: WorkerMetrics, max_tasks: int = 512, retry_s: float = 0.5, max_merged: int = 256):
        self.metrics = metrics
        self.retry_s = retry_s
        self.max_merged = max_merged
        self._tasks: queue.Queue[_Task | None] = queue.Queue(max_tasks)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ending: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def best_effort(self, name: str, run: Callable[[list[Any]], None], *items: Any) -> None:
        """run(items of this and the merged tasks); a Redis error skips it."""
        self._put(_Task(name, run, items, must_succeed=False))

    def must(self, name: str, run: Callable[[list[Any]], None], *items: Any, ending: Collection[str] = ()) -> None:
        """run(items of this and the merged tasks), retried until it succeeds or the worker stops."""
        ids = frozenset(ending)
        with self._lock:
            self._ending |= ids
        self._put(_Task(name, run, items, must_succeed=True, ending=ids))

    def ending(self) -> set[str]:
        """Ids whose terminal state is handed over but not written yet (never give these back)."""
        with self._lock:
            return set(self._ending)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every task handed over so far has run; False on timeout."""
        done = threading.Event()
        self._put(_Task("flush", lambda _: done.set(), (), must_succeed=False))
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
        next_task: list[_Task | None] = []  # a task taken out while merging, to run next
        while True:
            task = next_task.pop() if next_task else self._tasks.get()
            if task is None:
                return
            batch = [task]
            while len(batch) < self.max_merged:
                try:
                    more = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if more is not None and more.name == task.name and more.run == task.run:
                    batch.append(more)
                else:
                    next_task.append(more)
                    break
            merged = _Task(task.name, task.run, tuple(item for t in batch for item in t.items), task.must_succeed,
                           frozenset().union(*(t.ending for t in batch)))
            self._execute(merged)
            if merged.ending:
                with self._lock:
                    self._ending -= merged.ending

    def _execute(self, task: _Task) -> None:
        while True:
            try:
                task.run(list(task.items))
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
