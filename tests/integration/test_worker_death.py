"""kill -9 of a worker mid-batch, with a second worker alive: the job is rerun, same bytes."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.servers import (
    RedisServer,
    spawn_worker,
    stack_env,
    start_gateway,
    wait_until,
    wait_worker,
    worker_id_of,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BODY = {"seeds": [11, 12, 13, 14, 15, 16], "num_steps": 120, "class_label": 2}


def test_kill_9_mid_batch_reruns_the_job_elsewhere(redis_server: RedisServer, tiny_model: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    conn = redis_server.client()
    conn.flushdb()
    env = stack_env(redis_server.url, {"tiny": tiny_model})  # default heartbeat TTL (5 s)
    workers = [spawn_worker(env, tmp_path / f"worker{k}.log") for k in range(2)]
    gateway, url = start_gateway(env, tmp_path / "gateway.log")
    client = httpx.Client(base_url=url, timeout=60)
    try:
        for worker in workers:
            wait_worker(worker, conn)
        reference = client.post("/v1/generate", json=BODY, headers={"Accept": "application/json"})
        assert reference.status_code == 200
        job_id = client.post("/v1/jobs", json=BODY).json()["id"]
        view = wait_until(lambda: (v := client.get(f"/v1/jobs/{job_id}").json())["progress"]["nfe"]
                          > v["progress"]["nfe_total"] // 4 and v, 30)
        holder = conn.hget(f"edm:job:{job_id}", "worker").decode()
        victim = next(w for w in workers if worker_id_of(w, conn) == holder)
        survivor = next(w for w in workers if w is not victim)
        first_start = view["started_at"]

        killed_at = time.time()
        victim.kill_group()
        rerun = wait_until(lambda: (v := client.get(f"/v1/jobs/{job_id}").json())["started_at"] not in
                           (None, first_start) and v, 30, interval_s=0.02)
        kill_to_rerun_s = rerun["started_at"] - killed_at
        done = wait_until(lambda: (v := client.get(f"/v1/jobs/{job_id}").json())["status"] in
                          ("succeeded", "failed") and v, 60)
        assert done["status"] == "succeeded" and done["reruns"] == 1
        got = [client.get(image["url"]).content for image in done["images"]]
        want = [image["png_base64"] for image in reference.json()["images"]]
        assert got == [base64.b64decode(w) for w in want]
        assert worker_id_of(survivor, conn) is not None
        with capsys.disabled():
            print(f"\n[kill -9 -> rerun start: {kill_to_rerun_s:.2f} s (heartbeat TTL 5 s); "
                  f"job done {done['finished_at'] - killed_at:.2f} s after the kill]")
        assert kill_to_rerun_s < 30
    finally:
        client.close()
        gateway.stop()
        for worker in workers:
            if worker.alive():
                assert worker.stop() == 0
        conn.close()
