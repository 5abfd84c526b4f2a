"""Per-request context (pure ASGI): request id, body size and time limits, one log line, HTTP metrics,
and the catch-all for unexpected errors (a problem+json 500 carrying the request id).

The body is read here, whole (bodies are small by design), within EDM_BODY_TIMEOUT_S: a client
that declares a body and then trickles or withholds it gets 408 and loses its connection.
(A connection whose headers do not arrive in time is closed by the HTTP protocol: service/main.py.)"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from typing import Any

from starlette.requests import Request

from contract import logs
from service.errors import Problem, internal_error, problem_response
from service.metrics import GatewayMetrics

log = logging.getLogger("service.http")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class BodyTooLarge(Problem):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class BodyTooSlow(Problem):
    def __init__(self, limit_s: float):
        super().__init__(408, f"the request body did not arrive within {limit_s:g} s", headers={"Connection": "close"})


def _replay(body: bytes, receive: Any) -> Any:
    """A receive() that yields the already-read body once, then defers to the real one."""
    sent = [False]

    async def replay() -> dict[str, Any]:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class RequestContext:
    def __init__(self, app: Any, metrics: GatewayMetrics, max_body_bytes: int, body_timeout_s: float):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def _read_body(self, receive: Any) -> bytes | None:
        """The whole request body (small by design), or None once it passes the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else secrets.token_hex(8)
        token = logs.request_id.set(request_id)
        started = time.perf_counter()
        status = [500]
        answered = [False]

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                answered[0] = True
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    body = await self._read_body(receive)
            except TimeoutError:
                await problem_response(BodyTooSlow(self.body_timeout_s))(scope, receive, send_with_id)
                return
            if body is None:
                await problem_response(BodyTooLarge(self.max_body_bytes))(scope, receive, send_with_id)
            else:
                await self.app(scope, _replay(body, receive), send_with_id)
        except Exception:
            if answered[0]:
                raise  # too late for a problem document: the server ends the response
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            await problem_response(internal_error(), Request(scope))(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            self.metrics.http_requests.labels(path, scope["method"], str(status[0])).inc()
            self.metrics.http_seconds.labels(path).observe(elapsed)
            log.info("%s %s %d", scope["method"], scope["path"], status[0],
                     extra={"route": path, "status": status[0], "duration_s": round(elapsed, 4)})
            logs.request_id.reset(token)
