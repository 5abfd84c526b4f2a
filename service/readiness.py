"""Whether the gateway can serve: Redis answers and every configured model has a live worker.

A `ReadinessMonitor` checks this every EDM_READINESS_INTERVAL_S on a Redis connection of its own
and one thread of its own, so a flood of requests, a full connection pool or a busy thread pool
cannot delay or fail a probe: GET /readyz answers from the last check, and gRPC health follows it.
A check that has not completed for a while counts as not ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import anyio.to_thread
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
    def __init__(self, ledger: Ledger, catalog: Catalog, interval_s: float, timeout_s: float):
        self.ledger = ledger  # on a connection no request uses
        self.catalog = catalog
        self.interval_s = interval_s
        self.stale_s = max(3 * interval_s, timeout_s + 2 * interval_s)
        self.listeners: list[Callable[[bool], Awaitable[None]]] = []
        self._answer: dict[str, object] | Problem = Problem(503, "the gateway is starting",
                                                            headers={"Retry-After": "2"})
        self._checked_at = 0.0
        self._ready: bool | None = None
        self._thread = anyio.CapacityLimiter(1)
        self._task: asyncio.Task[None] | None = None

    def answer(self) -> dict[str, object]:
        """The last check's answer (raises its Problem when not ready)."""
        age = time.monotonic() - self._checked_at
        if self._checked_at and age > self.stale_s:
            raise Problem(503, f"readiness unknown: its last check completed {age:.1f} s ago",
                          headers={"Retry-After": "2"})
        if isinstance(self._answer, Problem):
            raise self._answer
        return self._answer

    @property
    def ready(self) -> bool:
        try:
            self.answer()
        except Problem:
            return False
        return True

    async def check(self) -> None:
        try:
            answer: dict[str, object] | Problem = await anyio.to_thread.run_sync(
                readiness, self.ledger, self.catalog, limiter=self._thread)
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
            for listener in self.listeners:
                await listener(ready)

    async def start(self) -> None:
        await self.check()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="readiness")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._answer = Problem(503, "the gateway is stopping", headers={"Retry-After": "2"})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the monitor must outlive a bug in one check
                log.exception("readiness check failed")
