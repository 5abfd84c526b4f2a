"""The gRPC server beside the REST app: edm.v1.GenerationService, grpc.health.v1 and reflection.

Started by the app's lifespan when EDM_GRPC_PORT is set (0: any free port; the log line
"gRPC listening" gives it). Health: SERVING while Redis answers and every configured model has a
live worker (the readiness of GET /readyz, re-checked every EDM_GRPC_HEALTH_INTERVAL_S), for the
whole server ("") and for edm.v1.GenerationService. Handlers run in a thread pool of
EDM_GRPC_THREADS threads; each open event stream holds one.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.errors import Problem
from service.grpc.interceptor import Interceptor
from service.grpc.servicer import Servicer
from service.grpc.stubs import SERVICE_NAME, service_grpc
from service.routes.health import readiness

log = logging.getLogger("service.grpc")


class GrpcServer:
    def __init__(self, state: Any):
        settings = state.settings
        self.state = state
        self.stopping = threading.Event()
        self._halt = threading.Event()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=settings.grpc_threads, thread_name_prefix="grpc"),
                                  interceptors=[Interceptor(state.metrics)])
        service_grpc.add_GenerationServiceServicer_to_server(Servicer(state, stopping=self.stopping), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        host = settings.host if ":" not in settings.host else f"[{settings.host}]"
        self.port = self.server.add_insecure_port(f"{host}:{settings.grpc_port}")
        if not self.port:
            raise RuntimeError(f"gRPC: cannot listen on {host}:{settings.grpc_port}")
        self.address = f"{settings.host}:{self.port}"
        self.interval_s = settings.grpc_health_interval_s
        self._serving: bool | None = None
        self._poller = threading.Thread(target=self._watch_readiness, name="grpc-health", daemon=True)

    def start(self) -> GrpcServer:
        self._set_serving(self._ready())
        self.server.start()
        self._poller.start()
        log.info("gRPC listening on %s", self.address, extra={"grpc_port": self.port, "service": SERVICE_NAME})
        return self

    def stop(self, grace_s: float = 2.0) -> None:
        """Streams end (UNAVAILABLE, their jobs go on), health says NOT_SERVING, then the server stops."""
        self.stopping.set()
        self._halt.set()
        self.health.enter_graceful_shutdown()
        self._poller.join(timeout=2 * self.interval_s + 1)
        self.server.stop(grace_s).wait(grace_s + 3)
        log.info("gRPC stopped")

    def _ready(self) -> bool:
        ledger = self.state.ledger
        if ledger is None:
            return False
        try:
            readiness(ledger, self.state.catalog)
        except (Problem, redis.RedisError):
            return False
        return True

    def _set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)
        if self._serving is not None:
            log.info("gRPC health: %s", "SERVING" if serving else "NOT_SERVING")
        self._serving = serving

    def _watch_readiness(self) -> None:
        while not self._halt.wait(self.interval_s):
            self._set_serving(self._ready())


def start(state: Any) -> GrpcServer:
    """Start serving the app's state (settings, ledger, catalog, metrics, key_hashes)."""
    return GrpcServer(state).start()
