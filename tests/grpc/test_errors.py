"""Status codes (INVALID_ARGUMENT naming the field, NOT_FOUND, UNAUTHENTICATED, RESOURCE_EXHAUSTED),
health (SERVING only with Redis and a worker), reflection and the gRPC request metric."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from contract.jobs import WorkerInfo
from service.grpc.stubs import job_pb2, service_grpc, service_pb2
from service.up import free_port
from tests.grpc.conftest import MODEL, Stack, kind, spec, stream_request
from tests.integration.servers import Process, RedisServer, stack_env, start_gateway, wait_until

pytestmark = [pytest.mark.integration]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def failure(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return raised.value


def trailers(error: grpc.RpcError) -> dict[str, str]:
    return dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]


@pytest.mark.parametrize(("fields", "field"), [
    ({"seeds": [1], "sampler": {"num_steps": 1}}, "spec.sampler.num_steps"),
    ({"seeds": [1], "sampler": {"num_steps": 100_000}}, "spec.sampler.num_steps"),
    ({"seeds": [1], "class_index": 10}, "spec.class_label"),
    ({"seeds": [1], "class_name": "eleven"}, "spec.class_label"),
    ({"seeds": [1], "sampler": {"sigma_min": 5.0, "sigma_max": 1.0}}, "spec.sampler.sigma_min"),
    ({"seeds": [1], "sampler": {"rho": -1.0}}, "spec.sampler.rho"),
    ({"seeds": [1], "sampler": {"s_churn": float("nan")}}, "spec.sampler.s_churn"),
    ({"seeds": [1], "sampler": {"solver": 7}}, "spec.sampler.solver"),
    ({"seeds": [1], "count": 2}, "spec.count"),
    ({"count": 10_000}, "spec.count"),
])
def test_invalid_argument_names_the_field(stack: Stack, fields: dict[str, Any], field: str) -> None:
    for call in (lambda: stack.stub.Generate(service_pb2.GenerateRequest(spec=spec(**fields)), timeout=10),
                 lambda: stack.stub.GenerateStream(stream_request(**fields), timeout=10)):
        error = failure(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error.details().startswith(f"{field}: "), error.details()
        assert trailers(error)["edm-field"] == field


def test_not_found(stack: Stack) -> None:
    for call in (lambda: stack.stub.GetJob(service_pb2.GetJobRequest(job_id="nope"), timeout=10),
                 lambda: stack.stub.WatchJob(service_pb2.WatchJobRequest(job_id="nope"), timeout=10),
                 lambda: stack.stub.CancelJob(service_pb2.CancelJobRequest(job_id="nope"), timeout=10)):
        assert failure(call).code() == grpc.StatusCode.NOT_FOUND
    error = failure(lambda: stack.stub.Generate(service_pb2.GenerateRequest(
        spec=job_pb2.GenerationSpec(model="nope", seeds=[1])), timeout=10))
    assert error.code() == grpc.StatusCode.NOT_FOUND and trailers(error)["edm-field"] == "spec.model"
    bad_cursor = failure(lambda: stack.stub.WatchJob(
        service_pb2.WatchJobRequest(job_id="nope", after_event_id="x"), timeout=10))
    assert bad_cursor.code() == grpc.StatusCode.INVALID_ARGUMENT and "after_event_id" in bad_cursor.details()


def test_models_health_reflection_and_metrics(stack: Stack) -> None:
    models = stack.stub.ListModels(service_pb2.ListModelsRequest(), timeout=10)
    assert models.default_model == MODEL
    (model,) = models.models
    assert (model.name, model.is_default, model.img_resolution, model.label_dim) == (MODEL, True, 16, 10)
    assert json.loads(model.card_json)["name"] == MODEL and list(model.class_names)[:2] == ["0", "1"]

    channel = grpc.insecure_channel(stack.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "edm.v1.GenerationService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    (listed,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=5)
    names = {s.name for s in listed.list_services_response.service}
    assert {"edm.v1.GenerationService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    (files,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="edm.v1.GenerationService")]), timeout=5)
    assert files.file_descriptor_response.file_descriptor_proto
    channel.close()

    failure(lambda: stack.stub.GetJob(service_pb2.GetJobRequest(job_id="nope"), timeout=10))
    text = httpx.get(stack.url + "/metrics", timeout=5).text
    assert 'edm_grpc_requests_total{code="NOT_FOUND",method="edm.v1.GenerationService/GetJob"}' in text
    assert 'edm_grpc_requests_total{code="OK",method="edm.v1.GenerationService/ListModels"} 1.0' in text


# -- a second gateway: API keys, a small queue limit, no worker ---------------------------------------

@dataclass
class Locked:
    url: str
    stub: Any
    health: Any
    redis: RedisServer
    gateway: Process

    def grpc_key(self, key: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {key}")]


@pytest.fixture(scope="module")
def locked(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    folder = tmp_path_factory.mktemp("locked")
    server = RedisServer(folder).start()
    port = free_port()
    env = stack_env(server.url, {MODEL: model_path}, EDM_GRPC_PORT=port, EDM_API_KEYS="alpha,beta",
                    EDM_MAX_QUEUED_NFE=80, EDM_READINESS_INTERVAL_S=0.1)
    gateway, url = start_gateway(env, folder / "gateway.log")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield Locked(url, service_grpc.GenerationServiceStub(channel), health_pb2_grpc.HealthStub(channel), server,
                     gateway)
    finally:
        channel.close()
        gateway.stop()
        server.stop()


def test_api_keys(locked: Locked) -> None:
    request = service_pb2.ListModelsRequest()
    for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", "alpha")]):
        error = failure(lambda m=metadata: locked.stub.ListModels(request, metadata=m, timeout=10))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    assert locked.stub.ListModels(request, metadata=locked.grpc_key("alpha"), timeout=10).models
    with httpx.Client(base_url=locked.url, headers={"Authorization": "Bearer alpha"}, timeout=10) as client:
        job_id = client.post("/v1/jobs", json={"seeds": [1], "num_steps": 3}).json()["id"]
    # A job belongs to the key that made it, over both APIs.
    assert locked.stub.GetJob(service_pb2.GetJobRequest(job_id=job_id), metadata=locked.grpc_key("alpha"),
                              timeout=10).job.status == job_pb2.JOB_STATUS_QUEUED
    error = failure(lambda: locked.stub.GetJob(service_pb2.GetJobRequest(job_id=job_id),
                                               metadata=locked.grpc_key("beta"), timeout=10))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    locked.stub.CancelJob(service_pb2.CancelJobRequest(job_id=job_id), metadata=locked.grpc_key("alpha"), timeout=10)


def test_queue_positions_resource_exhausted_and_cancel_while_queued(locked: Locked) -> None:
    key = locked.grpc_key("alpha")
    with httpx.Client(base_url=locked.url, headers={"Authorization": "Bearer alpha"}, timeout=10) as client:
        first, second = (client.post("/v1/jobs", json={"seeds": [k]}).json()["id"] for k in range(2))  # 35 NFE each
    error = failure(lambda: locked.stub.Generate(service_pb2.GenerateRequest(spec=spec(seeds=[3])), metadata=key,
                                                 timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and int(trailers(error)["retry-after"]) >= 1

    watcher = iter(locked.stub.WatchJob(service_pb2.WatchJobRequest(job_id=second), metadata=key, timeout=30))
    assert next(watcher).event.queued.position == 1
    locked.stub.CancelJob(service_pb2.CancelJobRequest(job_id=first), metadata=key, timeout=10)
    assert next(watcher).event.queued.position == 0
    locked.stub.CancelJob(service_pb2.CancelJobRequest(job_id=second), metadata=key, timeout=10)
    (end,) = [r.event for r in watcher]
    assert kind(end) == "error" and end.error.status == job_pb2.JOB_STATUS_CANCELLED and not end.event_id
    # A stream whose job is cancelled while still queued ends the same way.
    call = locked.stub.GenerateStream(stream_request(seeds=[4]), metadata=key, timeout=30)
    events = iter(call)
    queued = next(events).event
    assert queued.queued.position == 0
    locked.stub.CancelJob(service_pb2.CancelJobRequest(job_id=queued.job_id), metadata=key, timeout=10)
    assert kind([r.event for r in events][-1]) == "error"


def test_generate_whose_job_vanishes_is_not_found_not_an_empty_answer(locked: Locked) -> None:
    conn = locked.redis.client()
    before = set(conn.keys("edm:job:*"))
    outcome: list[Any] = []

    def generate() -> None:
        try:
            outcome.append(locked.stub.Generate(service_pb2.GenerateRequest(spec=spec(seeds=[5])),
                                                metadata=locked.grpc_key("alpha"), timeout=20))
        except grpc.RpcError as error:
            outcome.append(error)

    thread = threading.Thread(target=generate)
    thread.start()
    (key,) = wait_until(lambda: set(conn.keys("edm:job:*")) - before, 10)
    job_id = key.decode().rsplit(":", 1)[1]
    conn.lrem(f"rq:queue:{MODEL}", 1, job_id)
    conn.delete(key, f"rq:job:{job_id}")  # expired, or flushed by an operator
    thread.join(20)
    conn.close()
    (error,) = outcome
    assert isinstance(error, grpc.RpcError), error
    assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL) and error.details()


def test_health_serving_only_with_redis_and_a_worker(locked: Locked) -> None:
    def status() -> int:
        return int(locked.health.Check(health_pb2.HealthCheckRequest(service="edm.v1.GenerationService"),
                                       timeout=5).status)

    assert status() == NOT_SERVING  # Redis is up, no worker
    conn = locked.redis.client()
    info = WorkerInfo(id="w1", models=[MODEL], device="cpu", dtype="fp32", pid=1, host="h", started_at=time.time())
    conn.set("edm:hb:w1", info.model_dump_json(), px=60_000)
    conn.sadd("edm:workers", "w1")
    wait_until(lambda: status() == SERVING, 5)
    conn.delete("edm:hb:w1")  # its heartbeat expired
    wait_until(lambda: status() == NOT_SERVING, 5)
    conn.set("edm:hb:w1", info.model_dump_json(), px=60_000)
    wait_until(lambda: status() == SERVING, 5)
    conn.close()
    locked.redis.stop()
    wait_until(lambda: status() == NOT_SERVING, 10)
    error = failure(lambda: locked.stub.GetJob(service_pb2.GetJobRequest(job_id="A" * 24),
                                               metadata=locked.grpc_key("alpha"), timeout=10))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
