"""`edm-serve gateway`: run the REST gateway with uvicorn, and the gRPC server beside it when a
gRPC port is set (its log line "gRPC listening on HOST:PORT" gives the port). Settings come from
EDM_* variables; the options below override the most common ones."""

from __future__ import annotations

import argparse

from contract.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edm-serve gateway", description=__doc__)
    parser.add_argument("--host", help="bind address [EDM_HOST, default 127.0.0.1]")
    parser.add_argument("--port", type=int, help="port [EDM_PORT, default 8000]")
    parser.add_argument("--redis-url", help="Redis URL [EDM_REDIS_URL]")
    parser.add_argument("--grpc-port", type=int, help="gRPC port, 0 = any free one [EDM_GRPC_PORT, default: no gRPC]")
    args = parser.parse_args(argv)

    import uvicorn

    from service.app import create_app
    from service.settings import GatewaySettings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "redis_url": args.redis_url,
                                   "grpc_port": args.grpc_port}.items() if v is not None}
    settings = GatewaySettings(**overrides)
    setup_logging("gateway", settings.log_level)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=5)
    return 0
