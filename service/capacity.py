"""Limits on what waits in the gateway: open event streams and requests waiting for their job.

A limit is a counter under a lock (the REST and gRPC loops run on threads of their own and share
the limits: EDM_MAX_STREAMS counts SSE and gRPC streams together). A caller past the limit
gets 429 (gRPC: RESOURCE_EXHAUSTED) with Retry-After: waiting clients leave as their jobs end, so
room comes back within seconds.
"""

from __future__ import annotations

import threading

from prometheus_client import Gauge

from service.errors import Problem

RETRY_AFTER_S = 1


class Capacity:
    def __init__(self, what: str, limit: int, gauge: Gauge):
        self.what = what  # "open event streams", in the 429's detail
        self.limit = limit
        self.in_use = 0
        self._gauge = gauge
        self._lock = threading.Lock()

    def take(self) -> Slot:
        """A slot, to release when the waiting ends; Problem(429) when none is free."""
        with self._lock:
            if self.in_use >= self.limit:
                raise Problem(429, f"this gateway holds its limit of {self.limit} {self.what}; retry in "
                              f"{RETRY_AFTER_S} s or use another replica", headers={"Retry-After": str(RETRY_AFTER_S)})
            self.in_use += 1
            self._gauge.set(self.in_use)
        return Slot(self)

    def _release(self) -> None:
        with self._lock:
            self.in_use -= 1
            self._gauge.set(self.in_use)


class Slot:
    """One taken place; release() is idempotent (a stream may end on several paths)."""

    def __init__(self, capacity: Capacity):
        self._capacity: Capacity | None = capacity

    def release(self) -> None:
        if self._capacity is not None:
            self._capacity._release()
            self._capacity = None

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
