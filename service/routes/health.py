"""Liveness, readiness and the Prometheus endpoint, on the REST port and on the probe port.

None of these waits behind requests' Redis work: /healthz touches nothing but the loop watch;
/readyz answers from the readiness monitor's last check (service/readiness.py: its own Redis
connection and thread); /metrics renders on one thread of its own (app.state.probes). On the REST
port they still wait for the REST loop's turn, which a thousand busy streams make long; the probe
port (EDM_PROBE_PORT, service/probes.py) serves the same three on a loop and thread of their own.
"""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import Problem
from service.loops import LoopWatch

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, str]:
    """The process is up, its REST server listens and its event loops turn (it does not look at Redis
    or workers)."""
    return liveness(request.app.state.loops)


def liveness(loops: LoopWatch) -> dict[str, str]:
    """The /healthz answer (raises its Problem when not live); the probe port's too."""
    if loops.rest_listening is False:
        raise Problem(503, "the REST server is not listening (starting or stopping)", headers={"Retry-After": "1"})
    stalled = loops.stalled()
    if stalled:
        raise Problem(503, "event loops not turning: " + ", ".join(f"{name} for {s} s" for name, s in stalled.items()),
                      stalled=stalled, headers={"Retry-After": "1"})
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
