"""Liveness, readiness and the Prometheus endpoint.

These are `async def` and never use the shared thread pool: blocking routes (a sync generate
waits up to EDM_SYNC_TIMEOUT_S there) can take every thread, and a liveness probe that queues
behind them gets the gateway restarted. /healthz touches nothing; /readyz and /metrics, which
call Redis, run on a small thread limiter of their own (app.state.probe_threads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.catalog import Catalog
from service.errors import Problem
from service.ledger import Ledger

router = APIRouter(tags=["health"])
T = TypeVar("T")


async def _off_the_pool(request: Request, call: Callable[[], T]) -> T:
    return await anyio.to_thread.run_sync(call, limiter=request.app.state.probe_threads)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (it does not look at Redis or workers)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> dict[str, object]:
    """Redis answers and every configured model has at least one live worker. While a model has none,
    the 503 says which worker is downloading or loading it, with its progress (`loading`)."""
    state = request.app.state
    return await _off_the_pool(request, lambda: readiness(state.ledger, state.catalog))


def readiness(ledger: Ledger | None, catalog: Catalog) -> dict[str, object]:
    if ledger is None:
        raise Problem(503, "the gateway is starting or stopping", headers={"Retry-After": "2"})
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


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    body = await _off_the_pool(request, lambda: generate_latest(registry))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
