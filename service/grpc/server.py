"""The gRPC server beside the REST app, on the same event loop (grpc.aio): edm.v1.GenerationService,
grpc.health.v1 and reflection.

Started by the app's lifespan when EDM_GRPC_PORT is set (0: any free port; the log line
"gRPC listening" gives it). Health: SERVING while the gateway is ready (the readiness monitor of
GET /readyz, service/readiness.py: Redis answers and every configured model has a live worker),
for the whole server ("") and for edm.v1.GenerationService. No call holds a thread while it
waits: handlers are coroutines, and their short blocking work shares the gateway's pool.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.grpc.interceptor import Interceptor
from service.grpc.servicer import Servicer
from service.grpc.stubs import SERVICE_NAME, service_grpc

log = logging.getLogger("service.grpc")


class GrpcServer:
    def __init__(self, state: Any):
        settings = state.settings
        self.state = state
        self.stopping = asyncio.Event()
        self.server = grpc.aio.server(interceptors=[Interceptor(state.metrics)])
        service_grpc.add_GenerationServiceServicer_to_server(Servicer(state, stopping=self.stopping), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        host = settings.host if ":" not in settings.host else f"[{settings.host}]"
        self.port = self.server.add_insecure_port(f"{host}:{settings.grpc_port}")
        if not self.port:
            raise RuntimeError(f"gRPC: cannot listen on {host}:{settings.grpc_port}")
        self.address = f"{settings.host}:{self.port}"
        self._serving: bool | None = None

    async def start(self) -> GrpcServer:
        readiness = self.state.readiness
        await self.set_serving(readiness.ready)
        readiness.listeners.append(self.set_serving)
        await self.server.start()
        log.info("gRPC listening on %s", self.address, extra={"grpc_port": self.port, "service": SERVICE_NAME})
        return self

    def begin_stop(self) -> None:
        """From now on calls that end leave their jobs alone (a stopping gateway cancels nothing)."""
        self.stopping.set()

    async def stop(self, grace_s: float = 2.0) -> None:
        """Health says NOT_SERVING, then the server stops (open streams end UNAVAILABLE, their jobs go on)."""
        self.begin_stop()
        self.state.readiness.listeners.remove(self.set_serving)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        log.info("gRPC stopped")

    async def set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        if self._serving is not None:
            log.info("gRPC health: %s", "SERVING" if serving else "NOT_SERVING")
        self._serving = serving
