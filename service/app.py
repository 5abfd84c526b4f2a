"""The gateway's app factory. Settings, Redis client and catalog are built here, never at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import anyio.to_thread
from fastapi import FastAPI

from contract.ledger import connect
from contract.version import software_version
from service import errors, openapi
from service.auth import key_hash
from service.catalog import Catalog
from service.ledger import Ledger
from service.metrics import GatewayMetrics
from service.middleware import RequestContext
from service.routes import events, generate, health, jobs, models, ui
from service.settings import GatewaySettings

log = logging.getLogger("service.app")


class Server(Protocol):
    def stop(self) -> None: ...


def start_side_servers(app: FastAPI) -> list[Server]:
    """Servers that live as long as the app: the gRPC server when EDM_GRPC_PORT is set. It reads
    app.state (settings, ledger, catalog, metrics) like the REST routes."""
    if app.state.settings.grpc_port is None:
        return []
    from service.grpc.server import start  # grpc is imported only by a gateway that serves it

    return [start(app.state)]


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    catalog = Catalog.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        conn = connect(settings.redis_url, settings.redis_timeout_s)
        app.state.ledger = Ledger(conn, result_ttl_s=settings.result_ttl_s, failure_ttl_s=settings.failure_ttl_s,
                                  idempotency_ttl_s=settings.idempotency_ttl_s)
        # Route handlers block on Redis (sync waits included) in worker threads: allow enough of them.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.http_threads
        # ...but health and metrics never wait behind them (routes/health.py).
        app.state.probe_threads = anyio.CapacityLimiter(4)
        side_servers = start_side_servers(app)
        log.info("gateway ready", extra={"models": list(catalog.models), "redis": _redacted(settings.redis_url)})
        try:
            yield
        finally:
            for server in side_servers:
                server.stop()
            conn.close()
            app.state.ledger = None

    app = FastAPI(title="edm-serve", version=software_version(), lifespan=lifespan,
                  description="EDM diffusion models behind an API. Errors are application/problem+json.")
    app.state.settings = settings
    app.state.catalog = catalog
    app.state.ledger = None
    app.state.key_hashes = frozenset(key_hash(k) for k in settings.api_keys)
    app.state.metrics = GatewayMetrics(lambda: app.state.ledger, list(catalog.models))
    errors.install(app)
    openapi.install(app, settings)
    for module in (generate, jobs, events, models, health, ui):
        app.include_router(module.router)
    app.add_middleware(RequestContext, metrics=app.state.metrics, max_body_bytes=settings.max_body_bytes)
    return app


def _redacted(url: str) -> str:
    """A Redis URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
