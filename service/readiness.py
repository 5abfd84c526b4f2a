"""Whether the gateway can serve: Redis answers and every configured model has a live worker.

A `ReadinessMonitor` checks this every EDM_READINESS_INTERVAL_S on a Redis connection of its own
and one thread of its own, so a flood of requests, a full connection pool or a busy thread pool
cannot delay or fail a probe: GET /readyz answers from the last check, and gRPC health follows it.
A check that has not completed for a while counts as not ready.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import redis

from service.catalog import Catalog
from service.errors import Problem
from service.ledger import Ledger

log = logging.getLogger("service.readiness")


def readiness(ledger: Ledger, catalog: Catalog) -> dict[str, object]:
    """The ready answer, or Problem(503) saying what is missing (blocking: Redis round trips)."""
    ledger.ping()
    serving: dict[str, int] = {name: 0 for name in catalog.models}
    for worker in ledger.live_workers():
        for name in worker.models:
            if name in serving:
                serving[name] += 1
    missing = [name for name, n in serving.items() if n == 0]
    if missing:
        loading = ledger.loading(missing)
        detail = f"no live worker serves: {', '.join(missing)}"
        if loading:
            detail += "; loading: " + ", ".join(f"{name} ({_progress(state)})" for name, state in loading.items())
        raise Problem(503, detail, workers=serving, loading=loading, headers={"Retry-After": "2"})
    return {"status": "ready", "workers": serving}


def _progress(state: dict[str, object]) -> str:
    """'downloading 42%' / 'downloading 1048576 bytes' / 'loading'."""
    phase = str(state.get("phase", "loading"))
    done, total = state.get("bytes"), state.get("total_bytes")
    if isinstance(done, int) and isinstance(total, int) and total > 0:
        return f"{phase} {100 * done // total}%"
    return f"{phase} {done} bytes" if isinstance(done, int) else phase


class ReadinessMonitor:
    """Checks readiness every `interval_s` on a thread of its own (so no busy event loop delays a
    check and makes it look stale) and keeps the last answer. `listeners` are called on that
    thread when readiness changes; each hands the news to its own loop."""

    def __init__(self, ledger: Ledger, catalog: Catalog, interval_s: float, timeout_s: float):
        self.ledger = ledger  # on a connection no request uses
        self.catalog = catalog
        self.interval_s = interval_s
        self.stale_s = max(3 * interval_s, timeout_s + 2 * interval_s)
        self.listeners: list[Callable[[bool], None]] = []
        self._answer: dict[str, object] | Problem = Problem(503, "the gateway is starting",
                                                            headers={"Retry-After": "2"})
        self._checked_at = 0.0
        self._ready: bool | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edm-readiness", daemon=True)

    def answer(self) -> dict[str, object]:
        """The last check's answer (raises its Problem when not ready)."""
        answer, checked_at = self._answer, self._checked_at
        age = time.monotonic() - checked_at
        if checked_at and age > self.stale_s:
            raise Problem(503, f"readiness unknown: its last check completed {age:.1f} s ago",
                          headers={"Retry-After": "2"})
        if isinstance(answer, Problem):
            raise answer
        return answer

    @property
    def ready(self) -> bool:
        try:
            self.answer()
        except Problem:
            return False
        return True

    def check(self) -> None:
        try:
            answer: dict[str, object] | Problem = readiness(self.ledger, self.catalog)
        except Problem as problem:
            answer = problem
        except redis.RedisError as error:
            answer = Problem(503, f"the job store (Redis) is unreachable: {type(error).__name__}",
                             headers={"Retry-After": "2"})
        self._answer, self._checked_at = answer, time.monotonic()
        ready = not isinstance(answer, Problem)
        if ready != self._ready:
            if self._ready is not None:
                log.info("readiness: %s", "not ready: " + answer.detail if isinstance(answer, Problem) else "ready")
            self._ready = ready
            for listener in list(self.listeners):
                try:
                    listener(ready)
                except Exception:  # noqa: BLE001 - one listener's failure must not keep the news from the others
                    log.exception("readiness listener failed")

    async def start(self) -> None:
        """The first check (on the pool of the caller's loop), then one every `interval_s` on the thread."""
        await asyncio.get_running_loop().run_in_executor(None, self.check)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._answer = Problem(503, "the gateway is stopping", headers={"Retry-After": "2"})

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the monitor must outlive a bug in one check
                log.exception("readiness check failed")
