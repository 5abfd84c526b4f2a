"""The step scheduler in real worker processes: exactness under mixed traffic, fairness, a rerun that
does only the missing images, a job that fails alone."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from contract.jobs import JobSpec, JobStatus, SamplerParams
from contract.ledger import Keys
from model.checkpoint import load_model
from model.generate import generate
from model.images import decode_png
from model.samplers import SamplerSettings
from service.auth import ANONYMOUS
from service.ledger import Ledger
from service.up import free_port
from tests.integration.servers import RedisServer, spawn_worker, stack_env, start_gateway, wait_until, wait_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIXED = [
    {"num_steps": 6},
    {"num_steps": 9, "solver": "euler"},
    {"num_steps": 5, "S_churn": 40, "S_min": 0.05, "S_max": 50, "S_noise": 1.003},
    {"num_steps": 7, "solver": "euler", "discretization": "vp", "schedule": "vp", "scaling": "vp"},
    {"num_steps": 4, "solver": "heun", "discretization": "iddpm", "schedule": "linear", "scaling": "none"},
    {"num_steps": 12, "sigma_min": 0.01, "sigma_max": 30, "rho": 4},
]


@pytest.fixture()
def stack(redis_server: RedisServer, tiny_model: Path, tmp_path: Path):
    conn = redis_server.client()
    conn.flushdb()
    env = stack_env(redis_server.url, {"tiny": tiny_model})
    procs = []

    def worker(name: str, **options):
        proc = spawn_worker(env, tmp_path / f"{name}.log", **options)
        procs.append(proc)
        return wait_worker(proc, conn)


    gateway, url = start_gateway(env, tmp_path / "gateway.log")
    procs.append(gateway)
    client = httpx.Client(base_url=url, timeout=120)
    yield client, conn, worker
    client.close()
    for proc in procs:
        proc.stop()
    conn.close()


def status(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def finished(client: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    return wait_until(lambda: (v := status(client, job_id))["status"] in ("succeeded", "failed", "cancelled") and v,
                      timeout_s)


def test_mixed_settings_share_passes_and_match_solo_runs(stack, tiny_model: Path) -> None:
    client, _, worker = stack
    port = free_port()
    worker("w", max_pass_rows=8, slot_rows=16, cohort_rows=2, metrics_port=port)
    bodies = [{"seeds": [100 + k, 200 + k], "class_label": str(k % 10), **MIXED[k % len(MIXED)]} for k in range(12)]
    with ThreadPoolExecutor(12) as pool:
        ids = list(pool.map(lambda body: client.post("/v1/jobs", json=body).json()["id"], bodies))
    views = [finished(client, job_id) for job_id in ids]
    assert [v["status"] for v in views] == ["succeeded"] * 12
    net = load_model(tiny_model).net
    for body, view in zip(bodies, views, strict=True):
        settings = SamplerSettings(**{k: v for k, v in body.items() if k not in ("seeds", "class_label")})
        for image in view["images"]:
            got = decode_png(client.get(image["url"]).content)
            want = generate(net, [image["seed"]], [int(body["class_label"])], settings)[0].pixels
            assert np.array_equal(got, want), (body, image["seed"])
    metrics = [line for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines()
               if line.startswith("edm_pass_rows_sum") or line.startswith("edm_passes_total")]
    rows = float(next(m for m in metrics if m.startswith("edm_pass_rows_sum")).split()[-1])
    passes = float(next(m for m in metrics if m.startswith("edm_passes_total")).split()[-1])
    assert rows / passes > 2, "passes did not carry images of several jobs"


def test_small_job_behind_a_large_one(stack) -> None:
    """Bound: a one-image job admitted behind a job that fills the table is evaluated on every pass, so it
    finishes within its own NFE passes (35 here) plus admission, while the large job is still running."""
    client, conn, worker = stack
    worker("w", max_pass_rows=16, slot_rows=32, cohort_rows=4)
    big = client.post("/v1/jobs", json={"seeds": list(range(64)), "num_steps": 200}).json()["id"]
    wait_until(lambda: status(client, big)["progress"]["nfe"] > 0, 30)
    pass_s = _median_pass_seconds(client, big)
    asked = time.monotonic()
    small = client.post("/v1/generate", json={"seeds": [5], "num_steps": 18, "class_label": "3"})
    latency = time.monotonic() - asked
    assert small.status_code == 200
    assert status(client, big)["status"] == "running"
    bound = 35 * pass_s * 3 + 2.0  # 35 passes of at most a full pass each, with slack for a shared CPU
    assert latency < bound, (latency, pass_s)
    client.post(f"/v1/jobs/{big}/cancel")


def _median_pass_seconds(client: httpx.Client, job_id: str) -> float:
    first = status(client, job_id)["progress"]["nfe"]
    started = time.monotonic()
    time.sleep(1.0)
    done = status(client, job_id)["progress"]["nfe"] - first
    passes = max(1, done / 16)  # the big job alone fills 16-row passes
    return (time.monotonic() - started) / passes


def test_kill_9_rerun_computes_only_missing_images(stack) -> None:
    client, conn, worker = stack
    first = worker("first", max_pass_rows=4, slot_rows=4, cohort_rows=4)
    body = {"seeds": list(range(300, 316)), "num_steps": 30, "class_label": "1"}
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    others = [client.post("/v1/jobs", json={"seeds": [400 + k, 500 + k], **MIXED[k]}).json()["id"]
              for k in range(len(MIXED))]
    wait_until(lambda: 4 <= status(client, job_id)["progress"]["images_done"] < 12, 60, interval_s=0.02)
    first.kill_group()
    stored_before = conn.hlen(f"edm:images:{job_id}")
    assert 4 <= stored_before < 16
    second = worker("second", max_pass_rows=4, slot_rows=4, cohort_rows=4)
    view = finished(client, job_id, 120)
    assert view["status"] == "succeeded" and view["reruns"] == 1
    assert [finished(client, other)["status"] for other in others] == ["succeeded"] * len(others)  # none lost
    assert [image["seed"] for image in view["images"]] == body["seeds"]
    log = second.output()
    assert f"{stored_before} of 16 images already stored" in log
    reference = client.post("/v1/generate", json=body, headers={"Accept": "application/json"}).json()
    got = [decode_png(client.get(image["url"]).content) for image in view["images"]]
    want = [decode_png(base64.b64decode(image["png_base64"])) for image in reference["images"]]
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_job_that_fails_in_the_engine_fails_alone(stack) -> None:
    client, conn, worker = stack
    worker("w")
    ledger = Ledger(conn, result_ttl_s=60, failure_ttl_s=60)
    good = [client.post("/v1/jobs", json={"seeds": [k], "num_steps": 40}).json()["id"] for k in range(3)]
    # Settings the sampler cannot compute: the gateway refuses them, and so does the contract's model
    # (model_construct skips it, as a job queued by an older gateway would); the worker is the last line.
    bad, _ = ledger.submit(JobSpec(model="tiny", seeds=[1, 2], class_labels=[None, None],
                                   sampler=SamplerParams.model_construct(num_steps=8, sigma_max=1e30)), ANONYMOUS)
    views = {job_id: finished(client, job_id) for job_id in good}
    ended = wait_until(lambda: (s := ledger.status(bad)) is not None and s.terminal and s, 60)
    assert ended is JobStatus.failed  # (GET /v1/jobs would refuse to show its spec)
    assert "sigma_max" in conn.hget(Keys.job(bad), "error").decode()
    assert all(views[job_id]["status"] == "succeeded" and views[job_id]["reruns"] == 0 for job_id in good)
