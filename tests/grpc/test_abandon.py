"""Idempotency and abandonment agree (real Redis and gateway processes; the worker comes late or never):
a call or a sync request that ends before its job cancels the job only when it carried no
Idempotency-Key; a keyed job goes on, and a retry with the same key gets it, live, and its images."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis

from contract.jobs import JobStatus
from service.grpc.stubs import service_grpc, service_pb2
from service.ledger import Ledger
from service.up import free_port
from tests.grpc.conftest import MODEL, kind, spec, stream_request
from tests.integration.servers import RedisServer, spawn_worker, stack_env, start_gateway, wait_until

pytestmark = [pytest.mark.integration]

SETTLE_S = 2.0  # an abandoned job is cancelled well within this (the gateway acts when the call ends)


@dataclass
class Idle:
    """A gateway (REST and gRPC) on its own Redis, with no worker: every job stays queued."""

    url: str
    stub: Any
    conn: redis.Redis
    env: dict[str, str]
    folder: Path

    def status(self, job_id: str) -> JobStatus | None:
        return Ledger(self.conn, result_ttl_s=60, failure_ttl_s=60).status(job_id)

    def jobs(self) -> set[str]:
        return {key.decode().rsplit(":", 1)[1] for key in self.conn.keys("edm:job:*")}

    def new_job(self, before: set[str]) -> str:
        (job_id,) = self.jobs() - before
        return job_id


@pytest.fixture(scope="module")
def idle(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idle]:
    folder = tmp_path_factory.mktemp("abandon")
    server = RedisServer(folder).start()
    port = free_port()
    env = stack_env(server.url, {MODEL: model_path}, EDM_GRPC_PORT=port, EDM_SYNC_TIMEOUT_S=2)
    gateway, url = start_gateway(env, folder / "gateway.log")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    conn = server.client()
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield Idle(url, service_grpc.GenerationServiceStub(channel), conn, env, folder)
    finally:
        conn.close()
        channel.close()
        gateway.stop()
        server.stop()


def stays_queued(idle: Idle, job_id: str) -> None:
    """The job is still queued SETTLE_S after its caller left, with no cancellation asked for."""
    time.sleep(SETTLE_S)
    assert idle.status(job_id) is JobStatus.queued
    assert idle.conn.hget(f"edm:job:{job_id}", "cancel") == b"0"


def expire_generate(idle: Idle, request: Any, metadata: list[tuple[str, str]]) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        idle.stub.Generate(request, timeout=1.0, metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def expire_stream(idle: Idle, request: Any, metadata: list[tuple[str, str]]) -> str:
    """A GenerateStream whose deadline passes while its job is queued; returns the job id."""
    call = idle.stub.GenerateStream(request, timeout=1.5, metadata=metadata)
    events = iter(call)
    first = next(events).event
    assert kind(first) == "queued"
    with pytest.raises(grpc.RpcError) as raised:
        list(events)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return str(first.job_id)


# -- gRPC -------------------------------------------------------------------------------------------------

def test_keyed_generate_after_its_deadline_is_found_live_by_the_retry_and_completes(idle: Idle) -> None:
    request = service_pb2.GenerateRequest(spec=spec(seeds=[3, 4], sampler={"num_steps": 6}))
    metadata = [("idempotency-key", "order-grpc-1")]
    before = idle.jobs()
    expire_generate(idle, request, metadata)
    job_id = idle.new_job(before)
    stays_queued(idle, job_id)

    worker = spawn_worker(idle.env, idle.folder / "worker.log")
    try:
        answer = idle.stub.Generate(request, timeout=120, metadata=metadata)  # waits for the worker
        assert answer.job_id == job_id and len(answer.images) == 2
        assert [image.seed for image in answer.images] == [3, 4]
        assert idle.status(job_id) is JobStatus.succeeded
        assert idle.jobs() - before == {job_id}  # one job, ever
    finally:
        assert worker.stop() == 0, worker.output()[-3000:]


def test_keyed_generate_stream_after_its_deadline_leaves_the_job_queued_for_the_retry(idle: Idle) -> None:
    metadata = [("idempotency-key", "order-grpc-2")]
    job_id = expire_stream(idle, stream_request(preview_every=0, seeds=[5]), metadata)
    stays_queued(idle, job_id)
    again = expire_stream(idle, stream_request(preview_every=0, seeds=[5]), metadata)
    assert again == job_id
    stays_queued(idle, job_id)


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_unkeyed_call_that_ends_first_cancels_its_queued_job(idle: Idle, method: str) -> None:
    before = idle.jobs()
    if method == "Generate":
        expire_generate(idle, service_pb2.GenerateRequest(spec=spec(seeds=[6])), [])
        job_id = idle.new_job(before)
    else:
        job_id = expire_stream(idle, stream_request(preview_every=0, seeds=[6]), [])
    wait_until(lambda: idle.status(job_id) is JobStatus.cancelled, SETTLE_S)
    assert job_id.encode() not in idle.conn.lrange(f"rq:queue:{MODEL}", 0, -1)


# -- REST: a sync POST /v1/generate whose client disconnects -------------------------------------------------

def post_then_disconnect(idle: Idle, body: dict[str, Any], headers: dict[str, str], arrived: Callable[[], Any]) -> None:
    """Send POST /v1/generate on a raw socket, wait until its job exists, then close the connection."""
    data = json.dumps(body).encode()
    lines = ["POST /v1/generate HTTP/1.1", f"Host: {idle.url.removeprefix('http://')}",
             "Content-Type: application/json", f"Content-Length: {len(data)}",
             *(f"{name}: {value}" for name, value in headers.items())]
    host, port = idle.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + data)
        wait_until(arrived, 10)
    # closed before the gateway's sync timeout (2 s) passed: it sees the client go


@pytest.mark.parametrize("keyed", [False, True])
def test_sync_generate_whose_client_disconnects(idle: Idle, keyed: bool) -> None:
    body = {"model": MODEL, "seeds": [7], "num_steps": 6}
    headers = {"Idempotency-Key": "order-rest-1"} if keyed else {}
    before = idle.jobs()
    post_then_disconnect(idle, body, headers, lambda: idle.jobs() - before)
    job_id = idle.new_job(before)
    if not keyed:
        wait_until(lambda: idle.status(job_id) is JobStatus.cancelled, SETTLE_S)
        return
    stays_queued(idle, job_id)
    with httpx.Client(base_url=idle.url, timeout=30) as client:
        again = client.post("/v1/generate", json=body, headers=headers)  # no worker: 202 after the sync timeout
    assert again.status_code == 202 and again.json()["id"] == job_id and again.json()["status"] == "queued"
    assert again.headers["location"] == f"/v1/jobs/{job_id}"
