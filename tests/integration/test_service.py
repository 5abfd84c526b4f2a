"""The whole service with real processes: Redis, two workers and the gateway."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from model.images import decode_png, read_png_text
from service.up import free_port
from tests.integration.servers import (
    ROOT,
    Process,
    RedisServer,
    spawn_worker,
    stack_env,
    start_gateway,
    wait_until,
    wait_worker,
    worker_id_of,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Stack:
    url: str
    conn: redis.Redis
    workers: list[Process]
    metrics_url: str
    logs: Path

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("logs")
    conn = redis_server.client()
    conn.flushdb()
    env = stack_env(redis_server.url, {"tiny": tiny_model})
    metrics_port = free_port()
    workers = [spawn_worker(env, logs / f"worker{k}.log", max_pass_rows=16, metrics_port=metrics_port if k == 0 else 0)
               for k in range(2)]
    gateway, url = start_gateway(env, logs / "gateway.log")
    for worker in workers:
        wait_worker(worker, conn)
    yield Stack(url, conn, workers, f"http://127.0.0.1:{metrics_port}/metrics", logs)
    gateway.stop()
    codes = [worker.stop() for worker in workers]
    assert codes == [0, 0], [w.output()[-2000:] for w in workers]
    conn.close()


def cli_sample(model: Path, seeds: str, outdir: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "service.cli", "sample", "--model", str(model), "--seeds", seeds,
                    "--outdir", str(outdir), "--device", "cpu", *extra], check=True, cwd=ROOT, env=env,
                   capture_output=True)


def test_ready_and_models(stack: Stack) -> None:
    with stack.client() as client:
        # readiness is re-checked every EDM_READINESS_INTERVAL_S: the second worker shows within that
        ready = wait_until(lambda: (r := client.get("/readyz")).status_code == 200
                           and r.json()["workers"] == {"tiny": 2} and r, 5)
        assert ready.json()["status"] == "ready"


def test_service_adds_no_drift(stack: Stack, tiny_model: Path, tmp_path: Path) -> None:
    """PNG pixels equal what `edm-serve sample` writes for the same seeds and settings."""
    with stack.client() as client:
        given = client.post("/v1/generate", json={"seeds": [0, 1, 2, 3], "class_label": 3, "num_steps": 8},
                            headers={"Accept": "application/json"})
        drawn = client.post("/v1/generate", json={"seeds": [4, 5], "num_steps": 8, "S_churn": 10.0},
                            headers={"Accept": "application/json"})
    assert given.status_code == drawn.status_code == 200, given.text + drawn.text
    cli_sample(tiny_model, "0-3", tmp_path / "given", "--class", "3", "--steps", "8")
    cli_sample(tiny_model, "4-5", tmp_path / "drawn", "--steps", "8", "--S_churn", "10")
    for response, folder in ((given, "given"), (drawn, "drawn")):
        for image in response.json()["images"]:
            png = base64.b64decode(image["png_base64"])
            reference = (tmp_path / folder / f"{image['seed']:06d}.png").read_bytes()
            np.testing.assert_array_equal(decode_png(png), decode_png(reference))
            text = read_png_text(png)
            assert text == image["metadata"]
            assert text["edm:seed"] == str(image["seed"]) and text["edm:class_label"] == str(image["class_label"])
    assert [i["class_label"] for i in given.json()["images"]] == [3, 3, 3, 3]
    assert read_png_text(base64.b64decode(drawn.json()["images"][0]["png_base64"]))["edm:S_churn"] == "10.0"


def test_twenty_concurrent_requests_match_their_single_runs(stack: Stack) -> None:
    bodies = [{"seeds": [100 + k], "num_steps": 3 + k % 4, "class_label": None if k % 3 == 0 else k % 10}
              for k in range(20)]

    def png(body: dict) -> bytes:
        with stack.client() as client:
            response = client.post("/v1/generate", json=body, headers={"Accept": "image/png"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-seed"] == str(body["seeds"][0])
        return response.content

    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(png, bodies))
    alone = [png(body) for body in bodies]
    assert together == alone
    assert len(set(together)) == 20


def test_async_job_progress_images_and_cancel(stack: Stack) -> None:
    with stack.client() as client:
        job = client.post("/v1/jobs", json={"seeds": list(range(8)), "num_steps": 400}).json()
        url = f"/v1/jobs/{job['id']}"
        running = wait_until(lambda: (v := client.get(url).json())["progress"]["nfe"] > 0 and v, 30)
        assert running["status"] == "running" and running["started_at"] is not None
        asked = time.monotonic()
        assert client.post(url + "/cancel").status_code == 200
        done = wait_until(lambda: (v := client.get(url).json())["status"] == "cancelled" and v, 10)
        stopped_after = time.monotonic() - asked
        assert done["progress"]["nfe"] < done["progress"]["nfe_total"]
        assert stopped_after < 2.0, stopped_after
        # The slot is free again: a small job runs to the end, its images downloadable.
        small = client.post("/v1/jobs", json={"seeds": [7, 8], "num_steps": 4, "class_label": "5"}).json()
        view = wait_until(lambda: (v := client.get(f"/v1/jobs/{small['id']}").json())["status"] == "succeeded"
                          and v, 30)
        assert view["progress"]["nfe"] == view["progress"]["nfe_total"] == 2 * 7
        assert view["timings"]["total_s"] > 0 and [i["seed"] for i in view["images"]] == [7, 8]
        image = client.get(view["images"][1]["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert read_png_text(image.content)["edm:seed"] == "8"
        assert client.post(f"/v1/jobs/{small['id']}/cancel").status_code == 409


def test_worker_metrics(stack: Stack) -> None:
    text = httpx.get(stack.metrics_url, timeout=5).text
    for name in ("edm_images_total", "edm_nfe_total", "edm_pass_rows_bucket", "edm_pass_seconds",
                 "edm_passes_total", "edm_pass_padded_rows_total", "edm_admission_wait_seconds",
                 "edm_queue_wait_seconds", "edm_sampling_seconds", "edm_job_latency_seconds", "edm_slot_rows_used",
                 "edm_pass_loop_wait_seconds_total", "edm_worker_busy", "edm_worker_hung",
                 'edm_model_load_seconds{model="tiny"}'):
        assert name in text, name


def test_logs_are_json_lines_with_request_and_job_ids(stack: Stack) -> None:
    gateway = [json.loads(line) for line in (stack.logs / "gateway.log").read_text().splitlines()
               if line.startswith("{")]
    accepted = [line for line in gateway if line["msg"] == "job accepted"]
    assert accepted and all(line["request_id"] and line["job_id"] for line in accepted)
    assert any(line.get("route") == "/v1/generate" and line["request_id"] for line in gateway)
    worker = [json.loads(line) for line in (stack.logs / "worker0.log").read_text().splitlines()
              if line.startswith("{")]
    assert any(line["msg"] == "job succeeded" and line["job_id"] for line in worker)


def test_sigterm_finishes_the_running_batch_then_exits(stack: Stack) -> None:
    """Runs last in this module: it stops one of the two workers."""
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json={"seeds": list(range(6)), "num_steps": 100}).json()["id"]
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["nfe"] > 0, 30)
        holder = stack.conn.hget(f"edm:job:{job_id}", "worker").decode()
        worker = next(w for w in stack.workers if worker_id_of(w, stack.conn) == holder)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(60) == 0
        view = client.get(f"/v1/jobs/{job_id}").json()
        assert view["status"] == "succeeded" and view["reruns"] == 0
        assert not stack.conn.sismember("edm:workers", holder) and not stack.conn.exists(f"edm:claimed:{holder}")
