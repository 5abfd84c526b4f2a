"""GET /v1/models: every configured model with its card."""

from __future__ import annotations

import redis
from fastapi import APIRouter

from service.deps import CatalogDep, LedgerDep, OwnerDep
from service.schemas import ModelsResponse

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelsResponse)
def list_models(catalog: CatalogDep, ledger: LedgerDep, owner: OwnerDep) -> ModelsResponse:
    try:
        published = ledger.published_cards()
    except redis.RedisError:
        published = {}  # our own cards come from disk; only pickles' cards need Redis
    return ModelsResponse(default=catalog.default, models=catalog.describe(published))
