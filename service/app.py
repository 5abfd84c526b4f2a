"""The gateway's app factory. Settings, Redis client and catalog are built here, never at import."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
import redis
from fastapi import FastAPI
from redis.backoff import NoBackoff
from redis.retry import Retry

from contract.ledger import connect
from contract.version import software_version
from service import errors, openapi
from service.auth import key_hash
from service.capacity import Capacity
from service.catalog import Catalog
from service.events import EventHub
from service.ledger import Ledger
from service.loops import LoopWatch, blocking, use_pool
from service.metrics import GatewayMetrics
from service.middleware import RequestContext
from service.probes import ProbeServer
from service.readiness import ReadinessMonitor
from service.routes import events, generate, health, jobs, models, ui
from service.settings import GatewaySettings

log = logging.getLogger("service.app")


def gateway_connection(settings: GatewaySettings) -> redis.Redis:
    """The pool of the routes' short Redis work: at most redis_max_connections, and a request that
    finds none free waits for one rather than failing as if Redis were down. A blocking thread holds
    at most two at once, and the settings keep the pool above twice the threads: the wait is short."""
    timeout = settings.redis_timeout_s
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_max_connections, timeout=None,
        socket_timeout=timeout, socket_connect_timeout=min(timeout, 1.0), retry=Retry(NoBackoff(), 1))
    return redis.Redis(connection_pool=pool)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    catalog = Catalog.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        loop = asyncio.get_running_loop()
        conn = gateway_connection(settings)
        probe_conn = connect(settings.redis_url, settings.redis_timeout_s)  # probes never wait behind requests
        ledgers = {name: Ledger(c, result_ttl_s=settings.result_ttl_s, failure_ttl_s=settings.failure_ttl_s,
                                idempotency_ttl_s=settings.idempotency_ttl_s)
                   for name, c in (("ledger", conn), ("probe_ledger", probe_conn))}
        # Short blocking work (Redis round trips) of every loop runs on this pool; nothing waits on it.
        pool = ThreadPoolExecutor(settings.blocking_threads, thread_name_prefix="edm-blocking")
        use_pool(loop, pool)
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.blocking_threads  # Starlette's
        beat = loop.create_task(state.loops.beat("rest"), name="loop-watch")
        state.probes = anyio.CapacityLimiter(2)
        state.hub = EventHub(settings.redis_url, timeout_s=settings.redis_timeout_s, ledger=ledgers["ledger"],
                             blocking=blocking, buffer_bytes=settings.stream_buffer_bytes,
                             check_s=settings.readiness_interval_s, watched_jobs=app.state.metrics.watched_jobs)
        state.readiness = ReadinessMonitor(ledgers["probe_ledger"], catalog, settings.readiness_interval_s,
                                           settings.redis_timeout_s)
        state.probe_ledger = ledgers["probe_ledger"]
        state.hub.start()
        await state.readiness.start()
        state.ledger = ledgers["ledger"]
        servers: list[Any] = []  # the side loops' servers, stopped in reverse order
        try:
            if settings.probe_port is not None:
                servers.append(await ProbeServer(state, settings.host, settings.probe_port).start())
            if settings.grpc_port is not None:
                from service.grpc.server import GrpcServer  # grpc is imported only by a gateway that serves it

                state.grpc_server = await GrpcServer(state, pool, state.loops).start()
                servers.append(state.grpc_server)
            log.info("gateway ready", extra={"models": list(catalog.models), "redis": _redacted(settings.redis_url)})
            yield
        finally:
            await release_waiting(app)  # (done already when uvicorn stops it: GatewayServer in main.py)
            for server in reversed(servers):
                await server.stop()
            state.grpc_server = None
            await state.readiness.stop()
            state.ledger = None
            beat.cancel()
            for client in (conn, probe_conn):
                client.close()
                client.connection_pool.disconnect()
            pool.shutdown(wait=False)

    app = FastAPI(title="edm-serve", version=software_version(), lifespan=lifespan,
                  description="EDM diffusion models behind an API. Errors are application/problem+json.")
    app.state.settings = settings
    app.state.catalog = catalog
    app.state.ledger = None
    app.state.probe_ledger = None
    app.state.hub = None
    app.state.grpc_server = None
    app.state.loops = LoopWatch(settings.loop_stall_s)
    app.state.key_hashes = frozenset(key_hash(k) for k in settings.api_keys)
    app.state.metrics = metrics = GatewayMetrics(lambda: app.state.probe_ledger, list(catalog.models))
    app.state.streams = Capacity("open event streams", settings.max_streams, metrics.open_streams)
    app.state.waiting = Capacity("requests waiting for their job", settings.max_waiting, metrics.waiting_requests)
    errors.install(app)
    openapi.install(app, settings)
    for module in (generate, jobs, events, models, health, ui):
        app.include_router(module.router)
    app.add_middleware(RequestContext, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s)
    return app


async def release_waiting(app: FastAPI) -> None:
    """The first step of a shutdown, before the server waits for open requests to end: every waiting
    request and stream ends now (sync requests with 503 and their job's Location, streams so that
    clients resume elsewhere), and calls that end from now on cancel no job."""
    if app.state.grpc_server is not None:
        await app.state.grpc_server.begin_stop()
    if app.state.hub is not None:
        await app.state.hub.close()


def _redacted(url: str) -> str:
    """A Redis URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
