"""The gRPC server beside the REST app (grpc.aio): edm.v1.GenerationService, grpc.health.v1 and
reflection, on an event loop and thread of their own (service/loops.py).

Why its own loop: grpc.aio takes a new call off gRPC core once per turn of its loop, and gRPC
core cancels a call that waits there 30 s. On the REST loop, a thousand SSE readers made each turn
long enough that hundreds of new calls, health checks among them, were cancelled before a handler
saw them. The gRPC loop has its own event hub (one XREAD connection) and shares the rest with the
REST app: settings, catalog, metrics, ledger, the blocking pool and the stream / waiting limits.

Started by the app's lifespan when EDM_GRPC_PORT is set (0: any free port; the log line
"gRPC listening" gives it). Health: SERVING while the gateway is ready (the readiness monitor of
GET /readyz, service/readiness.py: Redis answers and every configured model has a live worker),
for the whole server ("") and for edm.v1.GenerationService. No call holds a thread while it
waits: handlers are coroutines, and their short blocking work shares the gateway's pool.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.events import EventHub
from service.grpc.interceptor import Interceptor
from service.grpc.servicer import Servicer
from service.grpc.stubs import SERVICE_NAME, service_grpc
from service.loops import LoopThread, LoopWatch, blocking, use_pool

log = logging.getLogger("service.grpc")
# gRPC core cancels a call that waits longer than 30 s for the server to take it (a busy loop takes
# calls slowly), with CANCELLED and no handler ever seeing it. The client's deadline decides
# instead; past the gateway's limits a handler answers RESOURCE_EXHAUSTED.
INTAKE = [("grpc.server_max_unrequested_time_in_server", 24 * 3600)]
STOP_TIMEOUT_S = 3.0  # a stuck gRPC loop must not hold the gateway's shutdown


class GrpcServer:
    """Built and started from the REST loop (`start`); everything it runs lives on its own loop."""

    def __init__(self, state: Any, pool: ThreadPoolExecutor, loops: LoopWatch):
        self.state = state
        self.pool = pool
        self.loops = loops
        self.thread = LoopThread("grpc")
        self.port = 0
        self.address = ""
        self.hub: EventHub | None = None
        self.stopping: asyncio.Event | None = None
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._serving: bool | None = None
        self._beat: asyncio.Task[None] | None = None
        self._health_lock: asyncio.Lock | None = None
        self._following: set[asyncio.Task[None]] = set()

    async def start(self) -> GrpcServer:
        self.thread.start()
        try:
            await self.thread.call(self._start())
        except BaseException:
            if self.hub is not None:
                await self.thread.call(self.hub.close(), timeout_s=STOP_TIMEOUT_S)
            await asyncio.get_running_loop().run_in_executor(None, self.thread.stop)
            raise
        self.state.readiness.listeners.append(self._readiness_changed)
        await self.thread.call(self._follow_readiness())  # after the listener: no change is missed
        log.info("gRPC listening on %s", self.address, extra={"grpc_port": self.port, "service": SERVICE_NAME})
        return self

    async def _start(self) -> None:
        """On the gRPC loop."""
        state, settings = self.state, self.state.settings
        loop = asyncio.get_running_loop()
        use_pool(loop, self.pool)
        self._beat = loop.create_task(self.loops.beat("grpc"), name="loop-watch")
        self.stopping = asyncio.Event()
        self._health_lock = asyncio.Lock()
        self.hub = EventHub(settings.redis_url, timeout_s=settings.redis_timeout_s, ledger=state.ledger,
                            blocking=blocking, buffer_bytes=settings.stream_buffer_bytes,
                            check_s=settings.readiness_interval_s, watched_jobs=state.metrics.watched_jobs)
        self.hub.start()
        self._server = server = grpc.aio.server(interceptors=[Interceptor(state.metrics)], options=INTAKE)
        service_grpc.add_GenerationServiceServicer_to_server(
            Servicer(state, hub=self.hub, stopping=self.stopping), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        host = settings.host if ":" not in settings.host else f"[{settings.host}]"
        self.port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
        if not self.port:
            raise RuntimeError(f"gRPC: cannot listen on {host}:{settings.grpc_port}")
        self.address = f"{settings.host}:{self.port}"
        await self._follow_readiness()
        await server.start()

    def _readiness_changed(self, ready: bool) -> None:
        """From the readiness monitor's thread: health follows on the gRPC loop (unless it has stopped)."""
        if self.thread.running:
            self.thread.call_soon(self._follow_readiness_soon)

    def _follow_readiness_soon(self) -> None:
        task = self.thread.loop.create_task(self._follow_readiness())
        self._following.add(task)  # a reference until it has run
        task.add_done_callback(self._following.discard)

    async def begin_stop(self) -> None:
        """From now on calls that end leave their jobs alone (a stopping gateway cancels nothing),
        and waiting calls and streams end now (UNAVAILABLE; their jobs go on)."""
        async def on_loop() -> None:
            if self.stopping is not None:
                self.stopping.set()
            if self.hub is not None:
                await self.hub.close()

        try:
            if self.thread.running:
                await self.thread.call(on_loop(), timeout_s=STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("the gRPC loop did not end its waiting calls in time")

    async def stop(self, grace_s: float = 2.0) -> None:
        """Waiting calls and streams end (begin_stop: UNAVAILABLE, their jobs go on), health says
        NOT_SERVING, the server stops, then its loop."""
        if self._readiness_changed in self.state.readiness.listeners:
            self.state.readiness.listeners.remove(self._readiness_changed)
        await self.begin_stop()  # (done already when the gateway stops: service/app.py release_waiting)

        async def on_loop() -> None:
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            if self._server is not None:
                await self._server.stop(grace_s)

        try:
            if self.thread.running:
                await self.thread.call(on_loop(), timeout_s=grace_s + STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("the gRPC server did not stop in time; stopping its loop")
        await asyncio.get_running_loop().run_in_executor(None, self.thread.stop)
        log.info("gRPC stopped")

    async def _follow_readiness(self) -> None:
        """Health takes the readiness of now (not of when a change was announced: the order in
        which announcements reach this loop then does not matter)."""
        if self._health is None or self._health_lock is None:
            return
        async with self._health_lock:
            serving = self.state.readiness.ready
            if serving == self._serving:
                return
            status = (health_pb2.HealthCheckResponse.SERVING if serving
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            for service in ("", SERVICE_NAME):
                await self._health.set(service, status)
            if self._serving is not None:
                log.info("gRPC health: %s", "SERVING" if serving else "NOT_SERVING")
            self._serving = serving
