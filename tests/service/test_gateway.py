"""The gateway over real HTTP (uvicorn on loopback) and a real Redis, without workers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from service.app import create_app
from service.auth import key_hash
from service.settings import GatewaySettings
from tests.integration.servers import RedisServer, ThreadedServer, wait_until

PROBLEM = "application/problem+json"
Start = Callable[..., httpx.Client]


@pytest.fixture()
def gateway(redis_conn: redis.Redis, redis_server: RedisServer, tiny_model: Path) -> Iterator[Start]:
    """start(**settings) -> an httpx client on a fresh gateway."""
    servers: list[ThreadedServer] = []
    clients: list[httpx.Client] = []

    def start(**overrides: object) -> httpx.Client:
        options: dict = {"redis_url": redis_server.url, "models": {"tiny": str(tiny_model)},
                         "bundled_model": False, **overrides}
        settings = GatewaySettings(**options)
        server = ThreadedServer(create_app(settings)).__enter__()
        servers.append(server)
        clients.append(httpx.Client(base_url=server.url, timeout=10))
        return clients[-1]

    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.__exit__()


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    if field is not None:
        assert body["field"] == field, body
    return body


def test_health_models_and_openapi(gateway: Start) -> None:
    client = gateway()
    assert client.get("/healthz").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["default"] == "tiny"
    (entry,) = models["models"]
    assert entry["name"] == "tiny" and entry["card"]["label_dim"] == 10
    assert entry["card"]["class_names"] == [str(k) for k in range(10)]
    assert "/v1/generate" in client.get("/openapi.json").json()["paths"]
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"


def test_waiting_requests_hold_no_thread_and_probes_stay_fast(gateway: Start, redis_conn: redis.Redis) -> None:
    client = gateway(blocking_threads=1, sync_timeout_s=4)
    waits = [threading.Thread(target=client.post, args=("/v1/generate",), kwargs={"json": {"seeds": [k]}})
             for k in range(6)]  # no worker: each waits sync_timeout_s for its job
    for wait in waits:
        wait.start()
    wait_until(lambda: redis_conn.llen("rq:queue:tiny") == 6, 3)  # all six are waiting for their jobs now
    for path, status in (("/healthz", 200), ("/readyz", 503), ("/metrics", 200), ("/v1/models", 200)):
        started = time.monotonic()
        assert client.get(path).status_code == status
        assert time.monotonic() - started < 1.0, path  # the one blocking thread is free: nobody waits on it
    assert "edm_gateway_waiting_requests 6.0" in client.get("/metrics").text
    for wait in waits:
        wait.join()
    assert "edm_gateway_waiting_requests 0.0" in client.get("/metrics").text


def test_waiting_requests_past_the_limit_get_429_before_any_job_is_made(gateway: Start,
                                                                      redis_conn: redis.Redis) -> None:
    client = gateway(max_waiting=2, sync_timeout_s=3)
    waits = [threading.Thread(target=client.post, args=("/v1/generate",), kwargs={"json": {"seeds": [k]}})
             for k in range(2)]
    for wait in waits:
        wait.start()
    wait_until(lambda: redis_conn.llen("rq:queue:tiny") == 2, 3)
    response = client.post("/v1/generate", json={"seeds": [9]})
    problem = assert_problem(response, 429)
    assert "2 requests waiting" in problem["detail"] and response.headers["retry-after"] == "1"
    assert redis_conn.llen("rq:queue:tiny") == 2  # refused before admission: no job for nobody
    for wait in waits:
        wait.join()


def test_submitted_job_is_an_rq_job_on_the_model_queue(gateway: Start, redis_conn: redis.Redis,
                                                        redis_server: RedisServer) -> None:
    client = gateway()
    response = client.post("/v1/jobs", json={"seeds": [1, 2], "class_label": "7", "num_steps": 4})
    assert response.status_code == 202
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    view = client.get(f"/v1/jobs/{job_id}").json()
    assert view["status"] == "queued" and view["queue_position"] == 0
    assert view["progress"] == {"step": 0, "num_steps": 4, "nfe": 0, "nfe_total": 2 * 7, "images_done": 0,
                                "images_total": 2}
    queue = Queue("tiny", connection=redis_conn, serializer=JSONSerializer)
    job = queue.fetch_job(job_id)
    assert queue.job_ids == [job_id] and job is not None
    assert job.func_name == "worker.tasks.generate"
    assert job.kwargs["spec"]["class_labels"] == [7, 7]
    assert redis_conn.hget(f"rq:job:{job_id}", "data") is not None  # JSON, not pickle: decodable below
    info = subprocess.run([sys.executable, "-m", "rq.cli", "info", "--url", redis_server.url,
                           "--serializer", "rq.serializers.JSONSerializer"], capture_output=True, text=True)
    assert "tiny" in info.stdout, info.stdout + info.stderr


def test_unknown_model_is_404(gateway: Start) -> None:
    assert_problem(gateway().post("/v1/jobs", json={"model": "nope"}), 404, "model")


@pytest.mark.parametrize(("body", "field"), [
    ({"class_label": 10}, "class_label"),
    ({"class_label": "seven"}, "class_label"),
    ({"class_label": "\u00b2"}, "class_label"),
    ({"class_label": -1}, "class_label"),
    ({"class_label": True}, "class_label"),
    ({"class_label": [1]}, "class_label"),
    ({"count": 9}, "count"),
    ({"seeds": list(range(9))}, "seeds"),
    ({"seeds": [1, -1]}, "seeds[1]"),
    ({"seeds": [1], "count": 2}, "count"),
    ({"seeds": []}, "seeds"),
    ({"num_steps": 101}, "num_steps"),
    ({"num_steps": 1}, "num_steps"),
    ({"sigma_min": 2.0, "sigma_max": 1.0}, "sigma_min"),
    ({"sigma_min": 0}, "sigma_min"),
    ({"sigma_max": -1.0}, "sigma_max"),
    ({"S_min": 2.0, "S_max": 1.0}, "S_max"),
    ({"solver": "rk4"}, "solver"),
    ({"discretization": "cosine"}, "discretization"),
    ({"schedule": "cosine"}, "schedule"),
    ({"scaling": "sqrt"}, "scaling"),
    ({"stepz": 3}, "stepz"),
])
def test_invalid_requests_are_422_naming_the_field(gateway: Start, body: dict, field: str) -> None:
    client = gateway(max_images=8, max_steps=100)
    for path in ("/v1/jobs", "/v1/generate"):
        problem = assert_problem(client.post(path, json=body), 422, field)
        assert problem["errors"][0]["field"] == field


def test_an_unexpected_error_is_a_problem_500(redis_server: RedisServer, tiny_model: Path) -> None:
    app = create_app(GatewaySettings(redis_url=redis_server.url, models={"tiny": str(tiny_model)},
                                     bundled_model=False))

    def broken() -> None:
        raise RuntimeError("a bug with a secret in it")

    app.add_api_route("/broken", broken)
    with ThreadedServer(app) as server:
        response = httpx.get(f"{server.url}/broken", headers={"X-Request-Id": "req-1"}, timeout=10)
    body = assert_problem(response, 500)
    assert "secret" not in response.text and body["request_id"] == "req-1"
    assert response.headers["x-request-id"] == "req-1"


def test_body_that_is_not_json_is_422(gateway: Start) -> None:
    response = gateway().post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_problem(response, 422)


def test_body_size_limit_is_413(gateway: Start) -> None:
    client = gateway(max_body_bytes=256)
    assert_problem(client.post("/v1/jobs", json={"seeds": list(range(100))}), 413)
    streamed = client.post("/v1/jobs", content=iter([b'{"seeds": [' + b"1," * 200 + b"1]}"]),
                           headers={"Content-Type": "application/json"})
    assert_problem(streamed, 413)


def test_auth_keys_isolate_jobs(gateway: Start, redis_conn: redis.Redis) -> None:
    client = gateway(api_keys=["alpha-key", "beta-key"])
    a = {"Authorization": "Bearer alpha-key"}
    b = {"Authorization": "Bearer beta-key"}
    missing = assert_problem(client.post("/v1/jobs", json={}), 401)
    assert "bearer" in client.post("/v1/jobs", json={}).headers["www-authenticate"].lower()
    assert missing["detail"]
    assert_problem(client.post("/v1/jobs", json={}, headers={"Authorization": "Bearer wrong"}), 401)
    assert_problem(client.get("/v1/models"), 401)
    job_id = client.post("/v1/jobs", json={"seeds": [3]}, headers=a).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=a).status_code == 200
    assert_problem(client.get(f"/v1/jobs/{job_id}", headers=b), 404)
    assert_problem(client.post(f"/v1/jobs/{job_id}/cancel", headers=b), 404)
    assert_problem(client.get(f"/v1/jobs/{job_id}/images/0.png", headers=b), 404)
    assert client.get(f"/v1/jobs/{job_id}", headers=a).json()["status"] == "queued"
    # Redis holds a hash of the key, never the key itself.
    assert redis_conn.hget(f"edm:job:{job_id}", "owner").decode() == key_hash("alpha-key")
    for key in redis_conn.scan_iter():
        assert b"alpha-key" not in key
        if redis_conn.type(key) == b"hash":
            assert not any(b"alpha-key" in v for v in redis_conn.hgetall(key).values())
    assert len(job_id) >= 22  # >= 128 random bits, URL-safe


def test_idempotency_key_returns_the_same_job(gateway: Start) -> None:
    client = gateway(api_keys=["alpha-key", "beta-key"])
    a = {"Authorization": "Bearer alpha-key", "Idempotency-Key": "order-17"}
    first = client.post("/v1/jobs", json={"seeds": [5]}, headers=a)
    again = client.post("/v1/jobs", json={"seeds": [5]}, headers=a)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert_problem(client.post("/v1/jobs", json={"seeds": [6]}, headers=a), 422, "Idempotency-Key")
    other = client.post("/v1/jobs", json={"seeds": [5]},
                        headers={"Authorization": "Bearer beta-key", "Idempotency-Key": "order-17"})
    assert other.json()["id"] != first.json()["id"]


def test_backpressure_is_429_with_retry_after(gateway: Start, redis_conn: redis.Redis) -> None:
    client = gateway(max_queued_nfe=100)
    body = {"seeds": [1], "num_steps": 18}  # 35 NFE each
    assert [client.post("/v1/jobs", json=body).status_code for _ in range(2)] == [202, 202]
    assert int(redis_conn.get("edm:queued_nfe")) == 70
    rejected = client.post("/v1/jobs", json=body)
    assert_problem(rejected, 429)
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["queued_nfe"] == 70
    metrics = client.get("/metrics").text
    assert 'edm_jobs_total{model="tiny",outcome="rejected"} 1.0' in metrics


def test_idempotency_key_replay_is_answered_when_the_queue_is_full(gateway: Start) -> None:
    client = gateway(max_queued_nfe=100)
    body = {"seeds": [1], "num_steps": 18}  # 35 NFE each
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-1"})
    assert client.post("/v1/jobs", json=body).status_code == 202
    assert_problem(client.post("/v1/jobs", json=body), 429)
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-1"})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert_problem(client.post("/v1/jobs", json={"seeds": [2]}, headers={"Idempotency-Key": "order-1"}), 422,
                   "Idempotency-Key")


def test_cancel_a_queued_job(gateway: Start, redis_conn: redis.Redis) -> None:
    client = gateway()
    job_id = client.post("/v1/jobs", json={"seeds": [1, 2]}).json()["id"]
    assert int(redis_conn.get("edm:queued_nfe")) == 70
    view = client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert view["status"] == "cancelled" and view["finished_at"] is not None
    assert redis_conn.llen("rq:queue:tiny") == 0
    assert int(redis_conn.get("edm:queued_nfe")) == 0
    assert redis_conn.hget(f"rq:job:{job_id}", "status") == b"canceled"
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert_problem(client.get(f"/v1/jobs/{job_id}/images/0.png"), 409)
    assert_problem(client.post("/v1/jobs/not-a-job/cancel"), 404)


def test_sync_generate_without_worker_answers_202_after_timeout(gateway: Start) -> None:
    client = gateway(sync_timeout_s=0.3)
    response = client.post("/v1/generate", json={"seeds": [1]})
    assert response.status_code == 202
    assert response.headers["location"].startswith("/v1/jobs/")
    assert response.json()["status"] == "queued"


def test_accept_png_with_several_seeds_is_406(gateway: Start) -> None:
    response = gateway().post("/v1/generate", json={"seeds": [1, 2]}, headers={"Accept": "image/png"})
    assert_problem(response, 406)


def test_readyz_needs_a_worker_and_metrics_are_exposed(gateway: Start) -> None:
    client = gateway()
    problem = assert_problem(client.get("/readyz"), 503)
    assert "tiny" in problem["detail"]
    client.post("/v1/jobs", json={"seeds": [1]})
    text = client.get("/metrics").text
    assert 'edm_queued_jobs{model="tiny"} 1.0' in text
    assert "edm_queued_nfe 35.0" in text
    assert "edm_redis_up 1.0" in text
    assert 'edm_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    assert 'edm_jobs_submitted_total{model="tiny"} 1.0' in text


def test_readyz_shows_a_model_that_a_worker_is_downloading(gateway: Start, redis_conn: redis.Redis) -> None:
    from worker.queue import WorkerQueue

    client = gateway()
    loader = WorkerQueue(redis_conn, "w-loading", result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=5, max_reruns=1)
    loader.report_loading("tiny", {"phase": "downloading", "bytes": 300, "total_bytes": 1200}, ttl_s=5)
    problem = wait_until(lambda: _loading_problem(client), 3)  # readiness is re-checked every 0.5 s
    assert "tiny (downloading 25%)" in problem["detail"]
    assert problem["loading"]["tiny"]["worker"] == "w-loading" and problem["loading"]["tiny"]["bytes"] == 300
    loader.loaded("tiny")
    wait_until(lambda: "loading" not in assert_problem(client.get("/readyz"), 503)["detail"], 3)


def _loading_problem(client: httpx.Client) -> dict | None:
    problem = assert_problem(client.get("/readyz"), 503)
    return problem if problem.get("loading") else None


def test_random_seed_when_none_given(gateway: Start) -> None:
    client = gateway()
    seeds = {client.post("/v1/jobs", json={}).json()["seeds"][0] for _ in range(3)}
    assert len(seeds) == 3
    assert client.post("/v1/jobs", json={"count": 3, "start": 10}).json()["seeds"] == [10, 11, 12]


def test_card_published_by_a_worker_serves_a_pickled_model(gateway: Start, redis_conn: redis.Redis,
                                                           tiny_model: Path, tmp_path: Path) -> None:
    pkl = tmp_path / "snapshot.pkl"
    pkl.write_bytes(b"not read by the gateway")
    client = gateway(models={"tiny": str(tiny_model), "nv": str(pkl)})
    assert_problem(client.post("/v1/jobs", json={"model": "nv"}), 503, "model")
    card = json.loads(tiny_model.read_text())
    redis_conn.hset("edm:cards", "nv", json.dumps(card))
    assert client.post("/v1/jobs", json={"model": "nv", "seeds": [1]}).status_code == 202
    listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert listed["nv"]["format"] == "nvlabs-pickle" and listed["nv"]["card"]["name"] == "tiny"


def test_a_full_redis_is_reported_as_full_not_unreachable(gateway: Start, redis_conn: redis.Redis) -> None:
    client = gateway()
    redis_conn.config_set("maxmemory-policy", "noeviction")
    redis_conn.config_set("maxmemory", "1")  # below what it holds: every write is refused (OOM)
    try:
        response = client.post("/v1/jobs", json={"seeds": [1], "num_steps": 4})
    finally:
        redis_conn.config_set("maxmemory", "0")
    problem = assert_problem(response, 503)
    assert "full" in problem["detail"] and "unreachable" not in problem["detail"]
