"""Admission over real HTTP and a real Redis, without workers: the per-request work limit (422 naming
the field), the queue limit held exactly under concurrent submitters in two gateway processes, and
Retry-After from the workers' measured rate."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydantic
import pytest
import redis

from contract.jobs import WorkerInfo
from service.jobs import RETRY_AFTER_MAX_S, RETRY_AFTER_UNKNOWN_S
from service.settings import GatewaySettings
from tests.integration.servers import Process, RedisServer, stack_env, start_gateway
from tests.service.test_gateway import Start, assert_problem, gateway  # noqa: F401

NFE = 35  # one image at 18 steps (Heun): 2 x 18 - 1 evaluations


def publish_worker(conn: redis.Redis, worker_id: str, nfe_per_s: float) -> None:
    """A live worker's heartbeat as a worker writes it (worker/queue.py), with the given measured rate."""
    info = WorkerInfo(id=worker_id, models=["tiny"], device="cpu", dtype="fp32", pid=1, host="h",
                      started_at=time.time(), nfe_per_s=nfe_per_s)
    conn.set(f"edm:hb:{worker_id}", info.model_dump_json(), px=60_000)
    conn.sadd("edm:workers", worker_id)


def test_per_request_limit_defaults_to_the_queue_limit_and_may_not_exceed_it() -> None:
    assert GatewaySettings().job_nfe_limit == GatewaySettings().max_queued_nfe == 200_000
    assert GatewaySettings(max_queued_nfe=500, max_job_nfe=100).job_nfe_limit == 100
    with pytest.raises(pydantic.ValidationError, match="could never be admitted"):
        GatewaySettings(max_queued_nfe=500, max_job_nfe=501)


def test_a_job_above_the_per_request_limit_is_422_naming_the_field(gateway: Start,  # noqa: F811
                                                                   redis_conn: redis.Redis) -> None:
    client = gateway(max_queued_nfe=1000, max_job_nfe=100)
    too_many = assert_problem(client.post("/v1/jobs", json={"seeds": [1, 2, 3], "num_steps": 18}), 422, "seeds")
    assert "3 images x 35 network evaluations = 105" in too_many["detail"]
    assert "limit of 100 per request" in too_many["detail"] and "at most 2 images" in too_many["detail"]
    counted = assert_problem(client.post("/v1/generate", json={"count": 3, "num_steps": 18}), 422, "count")
    assert "105" in counted["detail"] and "100" in counted["detail"]
    steps = assert_problem(client.post("/v1/jobs", json={"seeds": [1], "num_steps": 60}), 422, "num_steps")
    assert "119 network evaluations" in steps["detail"] and "fewer steps" in steps["detail"]
    assert int(redis_conn.get("edm:queued_nfe") or 0) == 0  # nothing refused was queued
    assert client.post("/v1/jobs", json={"seeds": [1, 2], "num_steps": 18}).status_code == 202
    assert int(redis_conn.get("edm:queued_nfe")) == 2 * NFE


def test_the_largest_request_is_refused_on_an_empty_queue_with_default_limits(gateway: Start,  # noqa: F811
                                                                             redis_conn: redis.Redis) -> None:
    client = gateway(max_images=256, max_steps=1000)
    problem = assert_problem(client.post("/v1/jobs", json={"count": 256, "num_steps": 1000}), 422, "count")
    assert "256 images x 1999 network evaluations = 511744" in problem["detail"]
    assert "limit of 200000 per request" in problem["detail"] and "at most 100 images" in problem["detail"]
    assert redis_conn.llen("rq:queue:tiny") == 0
    assert client.post("/v1/jobs", json={"count": 100, "num_steps": 1000}).status_code == 202


@pytest.mark.parametrize(("rates", "expected"), [
    ((4.0, 3.5), math.ceil(330 / 7.5)),   # the sum of the live workers' measured rates
    ((1000.0,), 1),                        # at least a second
    ((0.01,), RETRY_AFTER_MAX_S),          # bounded
    ((), RETRY_AFTER_UNKNOWN_S),           # no worker: nothing measured
    ((0.0,), RETRY_AFTER_UNKNOWN_S),       # a worker that has not run a pass yet
])
def test_retry_after_is_the_excess_over_the_measured_rate(gateway: Start, redis_conn: redis.Redis,  # noqa: F811
                                                          rates: tuple[float, ...], expected: int) -> None:
    client = gateway(max_queued_nfe=1000)
    for k, rate in enumerate(rates):
        publish_worker(redis_conn, f"w{k}", rate)
    assert client.post("/v1/jobs", json={"count": 20, "num_steps": 18}).status_code == 202  # 700 NFE
    assert client.post("/v1/jobs", json={"count": 8, "num_steps": 18}).status_code == 202   # 980 NFE
    refused = client.post("/v1/jobs", json={"count": 10, "num_steps": 18})  # 350 more: 330 above the limit
    problem = assert_problem(refused, 429)
    assert int(refused.headers["retry-after"]) == expected
    assert problem["queued_nfe"] == 980 and f"retry in about {expected} s" in problem["detail"]
    assert "this job needs 350 (limit 1000)" in problem["detail"]


# -- many submitters at once, two gateway processes, one Redis ------------------------------------------

LIMIT = 1400  # 40 one-image jobs


@pytest.fixture()
def two_gateways(redis_conn: redis.Redis, redis_server: RedisServer, tiny_model: Path,
                 tmp_path: Path) -> Iterator[list[str]]:
    env = stack_env(redis_server.url, {"tiny": tiny_model}, EDM_MAX_QUEUED_NFE=LIMIT, EDM_BLOCKING_THREADS=16)
    started: list[tuple[Process, str]] = []
    try:
        for k in range(2):
            started.append(start_gateway(env, tmp_path / f"gateway{k}.log"))
        yield [url for _, url in started]
    finally:
        for proc, _ in started:
            proc.stop()


def test_concurrent_submitters_never_push_queued_work_over_the_limit(two_gateways: list[str],
                                                                     redis_conn: redis.Redis) -> None:
    threads, per_thread = 24, 8
    start = threading.Barrier(threads)
    accepted: dict[str, int] = {}  # job id -> NFE
    keyed: dict[str, str] = {}     # Idempotency-Key -> job id, for the keys whose first request was accepted
    statuses: list[int] = []
    lock = threading.Lock()

    def submit(k: int) -> None:
        draw = random.Random(k)
        with httpx.Client(base_url=two_gateways[k % 2], timeout=30) as client:
            start.wait()
            for n in range(per_thread):
                images = draw.randint(1, 3)
                headers = {"Idempotency-Key": f"t{k}"} if n == 0 else {}
                response = client.post("/v1/jobs", json={"seeds": list(range(images)), "num_steps": 18},
                                       headers=headers)
                with lock:
                    statuses.append(response.status_code)
                    if response.status_code == 202:
                        accepted[response.json()["id"]] = images * NFE
                        if headers:
                            keyed[headers["Idempotency-Key"]] = response.json()["id"]

    workers = [threading.Thread(target=submit, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(statuses) == threads * per_thread and set(statuses) == {202, 429}, statuses
    queued = int(redis_conn.get("edm:queued_nfe"))
    assert queued == sum(accepted.values()) <= LIMIT  # exact: never over the limit, not even by one job
    assert redis_conn.llen("rq:queue:tiny") == len(accepted)
    assert LIMIT - queued < 3 * NFE  # and the queue did fill up: no room left for the largest job asked
    with httpx.Client(base_url=two_gateways[0], timeout=30) as client:
        for key, job_id in keyed.items():  # a replayed key gets its job even though the queue is full
            k = int(key[1:])
            images = random.Random(k).randint(1, 3)
            again = client.post("/v1/jobs", json={"seeds": list(range(images)), "num_steps": 18},
                                headers={"Idempotency-Key": key})
            assert again.status_code == 202 and again.json()["id"] == job_id
            assert again.headers["idempotent-replayed"] == "true"
