"""A real worker serving a model named by URL: downloaded from a loopback server once, converted into
the cache, loaded from the conversion on the next start, with the same images as the pickle."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from model.images import decode_png
from tests.integration.servers import RedisServer, spawn_worker, stack_env, start_gateway, wait_until, wait_worker
from tests.model import nvlabs_format as nv
from tests.model.file_server import FileServer
from tests.model.test_generate import TINY_KWARGS, tiny_net

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BODY = {"seeds": [0, 1, 2], "class_label": 4, "num_steps": 6, "S_churn": 5.0}


def generate(url: str) -> list[bytes]:
    r = httpx.post(f"{url}/v1/generate", json={"model": "dl", **BODY}, headers={"Accept": "application/json"},
                   timeout=120)
    assert r.status_code == 200, r.text
    return [base64.b64decode(image["png_base64"]) for image in r.json()["images"]]


def run_stack(env: dict[str, str], logs: Path, name: str, conn: redis.Redis) -> tuple[list[bytes], dict, str]:
    worker = spawn_worker(env, logs / f"{name}-worker.log")
    gateway = None
    try:
        wait_worker(worker, conn, timeout_s=120)
        gateway, url = start_gateway(env, logs / f"{name}-gateway.log")
        listing = {m["name"]: m for m in httpx.get(f"{url}/v1/models", timeout=10).json()["models"]}
        return generate(url), listing["dl"], worker.output()
    finally:
        if gateway is not None:
            gateway.stop()
        worker.stop()


def test_worker_downloads_once_and_then_starts_from_the_conversion(redis_server: RedisServer, tmp_path: Path) -> None:
    blob = nv.snapshot_bytes(tiny_net(), TINY_KWARGS)
    local = tmp_path / "tiny.pkl"
    local.write_bytes(blob)
    conn = redis_server.client()
    with FileServer({"/tiny.pkl": blob}) as server:
        env = stack_env(redis_server.url, {}, EDM_MODELS=f"dl={server.url('/tiny.pkl')}", EDM_ALLOW_HTTP="true",
                        EDM_CACHE_DIR=str(tmp_path / "cache"), EDM_LOG_LEVEL="INFO")
        conn.flushdb()
        first, listed, log1 = run_stack(env, tmp_path, "first", conn)
        assert server.requests == [("/tiny.pkl", None)] and "converting" in log1
        assert listed["source"]["url"] == server.url("/tiny.pkl")
        assert listed["sha256"] == hashlib.sha256(blob).hexdigest()

        conn.flushdb()
        second, _, log2 = run_stack(env, tmp_path, "second", conn)
        assert server.requests == [("/tiny.pkl", None)] and "converting" not in log2
        assert second == first  # byte-identical PNGs, metadata included

    # The same pixels as serving the pickle itself.
    conn.flushdb()
    env = stack_env(redis_server.url, {"dl": local})
    direct, listed, _ = run_stack(env, tmp_path, "pickle", conn)
    assert listed["format"] == "nvlabs-pickle"
    for a, b in zip(first, direct, strict=True):
        np.testing.assert_array_equal(decode_png(a), decode_png(b))
    conn.close()


def test_readiness_reports_the_download_until_the_model_is_served(redis_server: RedisServer, tmp_path: Path) -> None:
    blob = nv.snapshot_bytes(tiny_net(), TINY_KWARGS)
    conn = redis_server.client()
    conn.flushdb()
    with FileServer({"/slow.pkl": blob}) as server:
        server.delay_s = 0.1  # about 6 s for the file: long enough to watch
        env = stack_env(redis_server.url, {}, EDM_MODELS=f"dl={server.url('/slow.pkl')}", EDM_ALLOW_HTTP="true",
                        EDM_CACHE_DIR=str(tmp_path / "cache"))
        gateway, url = start_gateway(env, tmp_path / "gateway.log")
        worker = spawn_worker(env, tmp_path / "worker.log")
        try:
            seen = []

            def downloading() -> bool:
                body = httpx.get(f"{url}/readyz", timeout=5).json()
                state = body.get("loading", {}).get("dl", {})
                if state.get("phase") == "downloading":
                    seen.append(state["bytes"])
                return len(seen) >= 2 and seen[-1] > seen[0]
            wait_until(downloading, 60, worker, interval_s=0.2)
            assert "dl (downloading" in httpx.get(f"{url}/readyz", timeout=5).json()["detail"]
            assert 0 <= seen[0] < seen[-1] <= len(blob)  # bytes so far, growing
            wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 120, worker)
            assert not conn.exists("edm:loading:dl")  # cleared once the model is served
        finally:
            gateway.stop()
            worker.stop()
    conn.close()
