"""The probe port (EDM_PROBE_PORT): GET /healthz, /readyz and /metrics served by a uvicorn of their
own on an event loop and thread of their own (service/loops.py), so that an orchestrator's probe
is answered in milliseconds however long the REST loop's turns are. The answers are the REST
port's (service/routes/health.py), from the same state: liveness from the loop watch, readiness
from the readiness monitor, metrics from the gateway's registry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI

from service import errors
from service.loops import LoopThread
from service.routes import health

log = logging.getLogger("service.probes")


def probe_app(state: Any) -> FastAPI:
    """The health router alone, answering from the gateway's state (`readiness`, `loops`, `metrics`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.probes = anyio.CapacityLimiter(1)  # bound to this app's loop
        beat = asyncio.get_running_loop().create_task(state.loops.beat("probes"), name="loop-watch")
        try:
            yield
        finally:
            beat.cancel()

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)
    for name in ("readiness", "loops", "metrics"):
        setattr(app.state, name, getattr(state, name))
    errors.install(app)
    app.include_router(health.router)
    return app


class ProbeServer:
    def __init__(self, state: Any, host: str, port: int):
        # Bound here, so that a port in use fails the gateway's start with OSError (uvicorn would exit).
        self.socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port = self.socket.getsockname()[1]
        self.address = f"{host}:{self.port}"
        config = uvicorn.Config(probe_app(state), log_config=None, access_log=False, timeout_keep_alive=5,
                                timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread: LoopThread | None = None
        self._serving: concurrent.futures.Future[None] | None = None

    async def start(self) -> ProbeServer:
        self.thread = LoopThread("probes").start()
        self._serving = asyncio.run_coroutine_threadsafe(self.server.serve(sockets=[self.socket]), self.thread.loop)
        try:
            while not self.server.started:
                if self._serving.done():
                    self._serving.result()  # raises what stopped it
                    raise RuntimeError("the probe server stopped while starting")
                await asyncio.sleep(0.01)
        except BaseException:
            await self.stop()
            raise
        log.info("probes listening on %s", self.address, extra={"probe_port": self.port})
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._serving is not None:
            await asyncio.gather(asyncio.wrap_future(self._serving), return_exceptions=True)
        if self.thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.thread.stop)
        self.socket.close()
