"""Liveness, readiness and the Prometheus endpoint.

None of these waits behind requests: /healthz touches nothing; /readyz answers from the readiness
monitor's last check (service/readiness.py: its own Redis connection and thread); /metrics reads
the queue gauges on a small thread limiter and Redis connection of its own (app.state.probes).
"""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (it does not look at Redis or workers)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> dict[str, object]:
    """Redis answers and every configured model has at least one live worker. While a model has none,
    the 503 says which worker is downloading or loading it, with its progress (`loading`)."""
    return request.app.state.readiness.answer()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    state = request.app.state
    body = await anyio.to_thread.run_sync(generate_latest, state.metrics.registry, limiter=state.probes)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
