"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import CatalogDep, LedgerDep, MetricsDep
from service.errors import Problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (it does not look at Redis or workers)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(ledger: LedgerDep, catalog: CatalogDep) -> dict[str, object]:
    """Redis answers and every configured model has at least one live worker."""
    ledger.ping()
    serving: dict[str, int] = {name: 0 for name in catalog.models}
    for worker in ledger.live_workers():
        for name in worker.models:
            if name in serving:
                serving[name] += 1
    missing = [name for name, n in serving.items() if n == 0]
    if missing:
        raise Problem(503, f"no live worker serves: {', '.join(missing)}", workers=serving,
                      headers={"Retry-After": "2"})
    return {"status": "ready", "workers": serving}


@router.get("/metrics", include_in_schema=False)
def metrics(gateway: MetricsDep) -> Response:
    return Response(generate_latest(gateway.registry), media_type=CONTENT_TYPE_LATEST)
