"""The probe port (EDM_PROBE_PORT): GET /healthz, /readyz and /metrics served by a uvicorn of their
own on an event loop and thread of their own (service/loops.py), so that an orchestrator's probe
is answered in milliseconds however long the REST loop's turns are. The answers are the REST
port's (service/routes/health.py), from the same state: liveness from the loop watch, readiness
from the readiness monitor, metrics from the gateway's registry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import errors
from service.errors import Problem
from service.loops import LoopThread
from service.routes import health

log = logging.getLogger("service.probes")


class ProbeApp:
    """A bare ASGI app for GET /healthz, /readyz and /metrics, answering from the gateway's state
    (`loops`, `readiness`, `metrics`) with the REST port's answers (service/routes/health.py).
    Bare, not FastAPI: a probe runs far less Python, so it needs the GIL, which the busy loops
    beside it hold, for less time."""

    def __init__(self, state: Any):
        self.state = state
        self._beat: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        headers: dict[str, str] = {}
        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise Problem(405, f"{scope['method']} is not allowed here", headers={"Allow": "GET, HEAD"})
            if path == "/metrics":
                body = await asyncio.get_running_loop().run_in_executor(
                    None, generate_latest, self.state.metrics.registry)
                await _answer(send, 200, body, CONTENT_TYPE_LATEST)
                return
            if path == "/healthz":
                answer: dict[str, Any] = health.liveness(self.state.loops)
            elif path == "/readyz":
                answer = self.state.readiness.answer()
            else:
                raise Problem(404, "the probe port serves GET /healthz, /readyz and /metrics")
            status, media_type = 200, "application/json"
        except Problem as problem:
            answer, status, media_type = errors.problem_document(problem, path), problem.status, errors.PROBLEM_JSON
            headers = problem.headers
        await _answer(send, status, json.dumps(answer, separators=(",", ":")).encode(), media_type, headers)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                loop = asyncio.get_running_loop()
                self._beat = loop.create_task(self.state.loops.beat("probes"), name="loop-watch")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._beat is not None:
                    self._beat.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _answer(send: Any, status: int, body: bytes, media_type: str, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class ProbeServer:
    def __init__(self, state: Any, host: str, port: int):
        # Bound here, so that a port in use fails the gateway's start with OSError (uvicorn would exit).
        self.socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port = self.socket.getsockname()[1]
        self.address = f"{host}:{self.port}"
        config = uvicorn.Config(ProbeApp(state), log_config=None, access_log=False, timeout_keep_alive=5,
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
