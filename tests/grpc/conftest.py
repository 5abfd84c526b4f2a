"""A real stack for the gRPC tests: Redis (the session's, database 3), a worker and a gateway
with its gRPC server, shared by the whole package; helpers to read event streams."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.grpc.stubs import job_pb2, service_grpc, service_pb2
from service.up import free_port
from tests.integration.fixtures import redis_conn, redis_server, tiny_model  # noqa: F401
from tests.integration.servers import (
    Process,
    RedisServer,
    spawn_worker,
    stack_env,
    start_gateway,
    wait_until,
    wait_worker,
)

DB = 3  # not the database the other packages' fixtures flush
MODEL = "digits16"
RESOLUTION = 16
# Slow enough on one CPU thread that a forward pass of a few dozen images is measurable (~0.1 s).
NET = dict(img_resolution=RESOLUTION, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=32,
           channel_mult=[1, 2], num_blocks=2, attn_resolutions=[])


def make_model(folder: Path) -> Path:
    import torch

    from model.checkpoint import save_model
    from model.precond import EDMPrecond

    torch.manual_seed(1)
    save_model(EDMPrecond(**NET), folder, name=MODEL, class_names=[str(k) for k in range(10)], init_kwargs=NET)
    return folder / f"{MODEL}.json"


@dataclass
class Stack:
    url: str          # REST
    target: str       # gRPC host:port
    conn: redis.Redis
    worker: Process
    gateway: Process
    env: dict[str, str]
    stub: Any

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


@pytest.fixture(scope="package")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("digits16"))


@pytest.fixture(scope="package")
def stack(redis_server: RedisServer, model_path: Path,  # noqa: F811
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("grpc-logs")
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    port = free_port()
    env = stack_env(url, {MODEL: model_path}, EDM_GRPC_PORT=port, EDM_READINESS_INTERVAL_S=0.2)
    worker = spawn_worker(env, logs / "worker.log")
    gateway, http_url = start_gateway(env, logs / "gateway.log")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        wait_worker(worker, conn)
        grpc.channel_ready_future(channel).result(timeout=10)
        health = health_pb2_grpc.HealthStub(channel)
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                   == health_pb2.HealthCheckResponse.SERVING, 10)
        yield Stack(http_url, f"127.0.0.1:{port}", conn, worker, gateway, env,
                    service_grpc.GenerationServiceStub(channel))
    finally:
        channel.close()
        gateway.stop()
        code = worker.stop()
        conn.close()
    assert code == 0, worker.output()[-3000:]


def spec(**fields: Any) -> Any:
    """A GenerationSpec for the package's model; sampler options as keyword `sampler={...}`."""
    sampler = fields.pop("sampler", {})
    return job_pb2.GenerationSpec(model=MODEL, sampler=job_pb2.SamplerOptions(**sampler), **fields)


def stream_request(preview_every: int | None = None, **fields: Any) -> Any:
    request = service_pb2.GenerateStreamRequest(spec=spec(**fields))
    if preview_every is not None:
        request.preview_every = preview_every
    return request


def kind(event: Any) -> str:
    return str(event.WhichOneof("event"))


def read_sse(response: httpx.Response) -> list[dict[str, Any]]:
    """Server-Sent Events as dicts: id (or None), event, data (parsed JSON); comments skipped."""
    events, current = [], {}
    for line in response.iter_lines():
        if not line:
            if current:
                events.append({"id": current.get("id"), "event": current["event"],
                               "data": json.loads(current["data"])})
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            current[name] = value
    return events
