"""FastAPI dependencies as Annotated aliases: short route signatures, easy overrides in tests."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from service.auth import owner_of_request
from service.catalog import Catalog
from service.ledger import Ledger
from service.metrics import GatewayMetrics
from service.settings import GatewaySettings
from service.validation import IDEMPOTENCY_KEY_MAX, IDEMPOTENCY_KEY_PATTERN


def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


def get_ledger(request: Request) -> Ledger:
    return request.app.state.ledger


def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def get_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
LedgerDep = Annotated[Ledger, Depends(get_ledger)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
OwnerDep = Annotated[str, Depends(owner_of_request)]
# One rule with gRPC metadata (service/validation.py check_idempotency_key): empty or odd keys are 422s.
IdempotencyKeyDep = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=IDEMPOTENCY_KEY_MAX, pattern=IDEMPOTENCY_KEY_PATTERN,
    description="1 to 255 visible ASCII characters: the same key and body return the job it first made")]
