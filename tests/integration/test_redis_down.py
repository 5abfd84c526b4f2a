"""Redis goes away: the gateway answers 503 problem+json at once, and recovers when it returns."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.integration.servers import RedisServer, stack_env, start_gateway, wait_until

pytestmark = [pytest.mark.integration]


def test_gateway_503_while_redis_is_down_then_recovers(tiny_model: Path, tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    gateway, url = start_gateway(stack_env(server.url, {"tiny": tiny_model}), tmp_path / "gateway.log")
    client = httpx.Client(base_url=url, timeout=10)
    try:
        assert client.post("/v1/jobs", json={"seeds": [1]}).status_code == 202
        server.stop()
        # Readiness follows within one check (EDM_READINESS_INTERVAL_S, 0.5 s), on a connection of its own.
        wait_until(lambda: client.get("/readyz").status_code == 503, 3)
        for method, path in (("POST", "/v1/jobs"), ("POST", "/v1/generate"), ("GET", "/v1/jobs/" + "a" * 24),
                             ("GET", "/readyz")):
            started = time.monotonic()
            response = client.request(method, path, json={"seeds": [1]} if method == "POST" else None)
            elapsed = time.monotonic() - started
            assert response.status_code == 503, (path, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.headers["retry-after"] and elapsed < 3.0, (path, elapsed)
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/models").status_code == 200  # cards of our format come from disk
        assert "edm_redis_up 0.0" in client.get("/metrics").text
        server.start()
        wait_until(lambda: client.post("/v1/jobs", json={"seeds": [1]}).status_code == 202, 10)
    finally:
        client.close()
        gateway.stop()
        server.stop()
