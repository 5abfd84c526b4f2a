"""`edm-serve up`: Redis, a worker and the gateway from one command; Ctrl-C stops them all. Its Redis
is durable: kill -9 and a restart on the same directory keep every job and result (--ephemeral: not)."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from contract.jobs import ImageInfo, JobResult, JobSpec, JobStatus, SamplerParams
from contract.ledger import Keys, Outcome
from model.images import read_png_text
from service.ledger import Ledger
from service.up import default_redis_dir, free_port, start_redis
from tests.integration.servers import ROOT, stack_env, wait_until
from worker.queue import WorkerQueue

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_up(env: dict[str, str], *options: str) -> tuple[subprocess.Popen[str], str]:
    """`edm-serve up` with `options`; returns the process and its banner, once it is ready. A thread
    keeps reading its output (the worker and gateway log there too), so that no pipe fills up."""
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up", *options], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]

    def banner() -> str | None:
        if proc.poll() is not None:
            raise RuntimeError("edm-serve up exited:\n" + "".join(lines))
        text = "".join(lines)
        return text if "Ctrl-C stops everything" in text else None

    return proc, wait_until(banner, 120)


def redis_port_of(banner: str) -> int:
    found = re.search(r"Redis\s+redis://127\.0\.0\.1:(\d+)", banner)
    assert found is not None, banner
    return int(found.group(1))


def test_up_serves_and_stops_cleanly_on_ctrl_c(tiny_model: Path, tmp_path: Path) -> None:
    env = stack_env("unused", {"tiny": tiny_model})
    del env["EDM_REDIS_URL"]  # up starts its own Redis
    port, metrics_port = free_port(), free_port()
    data = tmp_path / "redis"
    proc, banner = start_up(env, "--port", str(port), "--metrics-port", str(metrics_port), "--redis-dir", str(data))
    try:
        assert f"http://127.0.0.1:{port}" in banner and f"append-only file in {data}" in banner
        redis_port = redis_port_of(banner)
        with redis.Redis(port=redis_port) as conn:
            assert conn.config_get("appendonly") == {"appendonly": "yes"}
            assert conn.config_get("appendfsync") == {"appendfsync": "everysec"}
            assert conn.config_get("dir") == {"dir": str(data)}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/generate", timeout=60,
                              json={"seeds": [0], "class_label": 7, "num_steps": 4})
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert read_png_text(response.content)["edm:class_label"] == "7"
        assert "edm_images_total" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert not port_open(port) and not port_open(metrics_port) and not port_open(redis_port)
        assert (data / "appendonly.aof").stat().st_size > 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_the_data_directory_defaults_to_the_state_dir_and_is_overridable(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    monkeypatch.delenv("EDM_REDIS_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_redis_dir() == tmp_path / "state" / "edm-serve" / "redis"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_redis_dir() == Path.home() / ".local" / "state" / "edm-serve" / "redis"
    monkeypatch.setenv("EDM_REDIS_DIR", str(tmp_path / "elsewhere"))
    assert default_redis_dir() == tmp_path / "elsewhere"


@pytest.fixture()
def redis_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_9(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def spec(steps: int = 18) -> JobSpec:
    return JobSpec(model="tiny", seeds=[0, 1], class_labels=[None, None], sampler=SamplerParams(num_steps=steps))


def test_kill_9_of_ups_redis_loses_no_job_and_no_result(tmp_path: Path,
                                                        redis_procs: list[subprocess.Popen[bytes]]) -> None:
    """Redis started as `edm-serve up` starts it: queued, claimed and finished jobs, PNGs and events are
    all there after a kill -9 and a restart on the same directory; with --ephemeral none is."""
    for durable in (True, False):
        port, data = free_port(), tmp_path / f"durable-{durable}"
        data.mkdir()
        redis_procs.append(start_redis(port, data, durable=durable))
        conn = redis.Redis(port=port)
        book = Ledger(conn, result_ttl_s=600, failure_ttl_s=600)
        ids = [book.submit(spec(), "o")[0] for _ in range(5)]
        worker = WorkerQueue(conn, "w1", result_ttl_s=600, failure_ttl_s=600, heartbeat_ttl_s=5, max_reruns=2)
        done, running = worker.claim("tiny", 2)
        worker.mark_started_many([done, running])
        infos = [ImageInfo(index=k, seed=k, class_label=k, metadata={}) for k in range(2)]
        worker.store_images([(done.id, [(info, b"png%d" % info.index) for info in infos])])
        result = JobResult(images=infos, worker="w1", sampling_s=0.1)
        assert worker.finish([Outcome(done.id, JobStatus.succeeded, result=result)]) == {done.id}
        worker.store_images([(running.id, [(infos[0], b"png0")])])
        before = {key: conn.type(key) for key in conn.keys("*")}
        kill_9(redis_procs[-1])  # at once: every reply above came after its write reached the file

        redis_procs.append(start_redis(port, data, durable=durable))
        if not durable:
            assert conn.dbsize() == 0  # the old behaviour: everything gone
            continue
        assert {key: conn.type(key) for key in conn.keys("*")} == before
        assert conn.lrange(Keys.queue("tiny"), 0, -1) == [i.encode() for i in ids[2:]]
        assert worker.held() == [running.id] and book.status(running.id) is JobStatus.running
        assert book.queued_nfe() == 3 * spec().nfe_total
        record = book.record(done.id)
        assert record is not None and record.status is JobStatus.succeeded and record.result == result
        assert book.pngs(done.id, 2) == [b"png0", b"png1"] and book.png(running.id, 0) == b"png0"
        assert [f[b"type"] for _, f in conn.xrange(f"edm:events:{done.id}")] == [b"started", b"image", b"image",
                                                                                  b"done"]
        # The worker goes on where it was: its claim is still its own.
        worker.store_images([(running.id, [(infos[1], b"png1")])])
        assert worker.take_lost() == set()
        assert worker.finish([Outcome(running.id, JobStatus.succeeded, result=result)]) == {running.id}
        conn.close()


def test_up_restarts_its_redis_after_kill_9_under_load_and_every_job_succeeds(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = stack_env("unused", {"tiny": tiny_model})
    del env["EDM_REDIS_URL"]
    port = free_port()
    proc, banner = start_up(env, "--port", str(port), "--metrics-port", "0", "--grpc-port", "-1",
                            "--redis-dir", str(tmp_path / "redis"))
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        conn = redis.Redis(port=redis_port_of(banner))
        body = {"seeds": [0, 1, 2], "num_steps": 60, "class_label": 4}
        first = client.post("/v1/generate", json=body, headers={"Accept": "application/json"})
        assert first.status_code == 200
        first_id = first.json()["job_id"]
        ids = [client.post("/v1/jobs", json={**body, "seeds": [k, k + 100]}).json()["id"] for k in range(12)]
        wait_until(lambda: client.get(f"/v1/jobs/{ids[0]}").json()["status"] == "running", 30)
        pid = int(conn.info("server")["process_id"])
        unfinished = len(ids) - sum(conn.hexists(Keys.job(job_id), "finished") for job_id in ids)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: _answers(conn) and int(conn.info("server")["process_id"]) != pid, 30)
        back_s = time.monotonic() - killed_at

        def ended() -> list[str] | None:
            try:
                statuses = [client.get(f"/v1/jobs/{job_id}").json().get("status") for job_id in ids]
            except httpx.HTTPError:
                return None
            return statuses if all(s in ("succeeded", "failed", "cancelled") for s in statuses) else None

        assert wait_until(ended, 120, interval_s=0.5) == ["succeeded"] * len(ids)
        again = client.get(f"/v1/jobs/{first_id}/images/0.png")
        assert again.status_code == 200
        assert again.content == base64.b64decode(first.json()["images"][0]["png_base64"])
        with capsys.disabled():
            print(f"\n[kill -9 of up's Redis with {unfinished} of {len(ids)} jobs unfinished: Redis back in "
                  f"{back_s:.2f} s, all {len(ids)} succeeded, 0 lost; the earlier result still served]")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _answers(conn: redis.Redis) -> bool:
    try:
        return bool(conn.ping())
    except redis.RedisError:
        return False
