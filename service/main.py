"""`edm-serve gateway`: run the REST gateway with uvicorn, the gRPC server beside it when a gRPC
port is set (its log line "gRPC listening on HOST:PORT" gives the port) and the probe server when
a probe port is set ("probes listening on HOST:PORT"). Settings come from
EDM_* variables; the options below override the most common ones."""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from contract.logs import setup_logging

SWITCH_INTERVAL_S = 0.001  # Python's default is 0.005
# Python's cyclic garbage collector stops every thread while it runs: with a thousand open streams,
# a collection of the older generations took about 100 ms, and a probe waited for it (probe-port
# p99 53-100 ms at 1,000 SSE readers with the defaults, 15-25 ms with these; bench/gateway_scale.py).
# Young collections every 20,000 allocations instead of 700; each older generation is collected at
# every 20th collection of the one below it (default: 10th).
GC_THRESHOLDS = (20_000, 20, 20)


class GatewayServer(uvicorn.Server):
    """uvicorn's server, with a first step to its shutdown: uvicorn waits a few seconds for open
    requests, then cancels them with a bare 500; the gateway instead ends its waiting requests and
    streams at once, each with an answer (service/app.py release_waiting)."""

    def __init__(self, config: uvicorn.Config, before_shutdown: Callable[[], Awaitable[None]],
                 serving: Callable[[bool], None] = lambda _: None):
        super().__init__(config)
        self.before_shutdown = before_shutdown
        self.serving = serving  # told when the REST port starts and stops taking connections

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.serving(not self.should_exit)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.serving(False)
        await self.before_shutdown()
        await super().shutdown(sockets)


def header_deadline(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's line and headers: a connection
    that opens and stays silent, or trickles its headers (slowloris), is closed after `timeout_s`.
    (uvicorn bounds the idle time between requests, EDM keep-alive, but not this.)"""

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._between_requests():
                self._arm()
            super().data_received(data)
            if not self._between_requests():
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edm-serve gateway", description=__doc__)
    parser.add_argument("--host", help="bind address [EDM_HOST, default 127.0.0.1]")
    parser.add_argument("--port", type=int, help="port [EDM_PORT, default 8000]")
    parser.add_argument("--redis-url", help="Redis URL [EDM_REDIS_URL]")
    parser.add_argument("--grpc-port", type=int, help="gRPC port, 0 = any free one [EDM_GRPC_PORT, default: no gRPC]")
    parser.add_argument("--probe-port", type=int,
                        help="port of /healthz, /readyz and /metrics on a loop of their own, 0 = any free one "
                             "[EDM_PROBE_PORT, default: none]")
    args = parser.parse_args(argv)

    from service.app import create_app, release_waiting
    from service.settings import GatewaySettings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "redis_url": args.redis_url,
                                   "grpc_port": args.grpc_port, "probe_port": args.probe_port}.items() if v is not None}
    settings = GatewaySettings(**overrides)
    setup_logging("gateway", settings.log_level)
    # The REST, gRPC and probe loops run on threads of one interpreter: a thread that waits for the
    # GIL gets it within this interval, so a probe waits milliseconds behind busy loops, not 5 each.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = create_app(settings)
    gc.freeze()  # what startup made (modules, the app) is never scanned again
    gc.set_threshold(*GC_THRESHOLDS)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5, http=header_deadline(settings.header_timeout_s))
    app.state.loops.rest_listening = False  # the probe port says so until uvicorn listens (GatewayServer.startup)
    GatewayServer(config, before_shutdown=lambda: release_waiting(app),
                  serving=lambda listening: setattr(app.state.loops, "rest_listening", listening)).run()
    return 0
