"""The gateway's event loops and the thread pool they share.

One gateway process runs three loops: uvicorn's (REST and SSE), one for gRPC and one for the probe
port (EDM_PROBE_PORT: /healthz, /readyz, /metrics). A loop's turn runs every callback that became
ready, so with a thousand busy streams one turn can take hundreds of milliseconds, and whatever
shares that loop waits for it: gRPC's intake of new calls, and a probe. Each loop therefore has a
thread of its own: a turn of one no longer delays the others (they share the GIL, which a busy
thread hands over every few milliseconds). `LoopWatch` records that each loop still turns, for
liveness. Short blocking work (Redis round trips) of the REST and gRPC loops runs on one bounded
pool (`use_pool`, `blocking`), so EDM_BLOCKING_THREADS bounds the requests' Redis work in the
process, not per loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger("service.loops")
T = TypeVar("T")

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ThreadPoolExecutor] = weakref.WeakKeyDictionary()


def use_pool(loop: asyncio.AbstractEventLoop, pool: ThreadPoolExecutor) -> None:
    """Make `blocking` on this loop run on `pool` (the gateway's, shared by its loops)."""
    _pools[loop] = pool


async def blocking(call: Callable[[], T]) -> T:
    """Run a short blocking call (Redis work) on the gateway's bounded pool (EDM_BLOCKING_THREADS),
    or the loop's default executor where no gateway pool is set (tests of one part)."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()  # the request's id and the like reach the call's logs
    return await loop.run_in_executor(_pools.get(loop), context.run, call)


class LoopThread:
    """An event loop running on a daemon thread of its own."""

    def __init__(self, name: str):
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"edm-{name}-loop", daemon=True)

    def start(self) -> LoopThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:  # what asyncio.run does at its end
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    async def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Await `coro` run on this loop, from a coroutine on another loop (TimeoutError after
        `timeout_s`: a stuck loop must not hang its caller, a shutdown say)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        finally:
            future.cancel()  # (no effect once it has run)

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run `callback` on this loop, from any thread."""
        self.loop.call_soon_threadsafe(callback)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel what still runs on the loop, stop it and close it (from another thread)."""
        if not self._thread.is_alive():
            if self._thread.ident is None and not self.loop.is_closed():  # never started
                self.loop.close()
            return

        async def cancel_tasks() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_tasks(), self.loop).result(timeout_s)
        except Exception:  # noqa: BLE001 - stopping goes on whatever a task did
            log.warning("tasks of the %s loop did not end in %.0f s", self.name, timeout_s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the %s loop did not stop in %.0f s", self.name, timeout_s)


class LoopWatch:
    """When each of the gateway's loops last turned. Each loop runs `beat(name)`; `stalled()` names
    the loops that have not turned for `stall_s` (liveness fails then: a loop that stops turning
    serves nobody, whatever the other loops answer). `rest_listening`: whether the REST server takes
    connections, as `edm-serve gateway` reports it (None: not reported), so that the probe port does
    not call a gateway healthy before its REST port listens or after it has closed."""

    def __init__(self, stall_s: float, every_s: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self.stall_s = stall_s
        self.every_s = every_s
        self.clock = clock
        self.turned: dict[str, float] = {}
        self.rest_listening: bool | None = None

    async def beat(self, name: str) -> None:
        """Record every `every_s` that this loop turns; runs until cancelled."""
        try:
            while True:
                self.turned[name] = self.clock()
                await asyncio.sleep(self.every_s)
        finally:
            self.turned.pop(name, None)  # a loop that stops on purpose is not stalled

    def stalled(self) -> dict[str, float]:
        """{loop name: seconds since it last turned} for the loops past `stall_s`."""
        now = self.clock()
        return {name: round(now - at, 1) for name, at in list(self.turned.items()) if now - at > self.stall_s}
