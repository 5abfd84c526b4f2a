"""FastAPI dependencies as Annotated aliases: short route signatures, easy overrides in tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from service.auth import owner_of_request
from service.capacity import Capacity
from service.catalog import Catalog
from service.events import EventHub
from service.ledger import Ledger
from service.metrics import GatewayMetrics
from service.settings import GatewaySettings
from service.validation import IDEMPOTENCY_KEY_MAX, IDEMPOTENCY_KEY_PATTERN


def _state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency that returns app.state.<name> (async: it runs on the event loop, not on the pool)."""

    async def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    return get


SettingsDep = Annotated[GatewaySettings, Depends(_state("settings"))]
LedgerDep = Annotated[Ledger, Depends(_state("ledger"))]
CatalogDep = Annotated[Catalog, Depends(_state("catalog"))]
MetricsDep = Annotated[GatewayMetrics, Depends(_state("metrics"))]
HubDep = Annotated[EventHub, Depends(_state("hub"))]
StreamsDep = Annotated[Capacity, Depends(_state("streams"))]
WaitingDep = Annotated[Capacity, Depends(_state("waiting"))]
OwnerDep = Annotated[str, Depends(owner_of_request)]
# One rule with gRPC metadata (service/validation.py check_idempotency_key): empty or odd keys are 422s.
IdempotencyKeyDep = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=IDEMPOTENCY_KEY_MAX, pattern=IDEMPOTENCY_KEY_PATTERN,
    description="1 to 255 visible ASCII characters: the same key and body return the job it first made")]
