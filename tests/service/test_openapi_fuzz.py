"""Schemathesis against the gateway's /openapi.json: a real Redis, a real gateway process and a real
worker on the bundled model, every check, every phase (examples, coverage, fuzzing, and the
stateful one that follows the document's links from POST /v1/jobs to GET, cancel, events and
images), derandomized, bounded (about a minute on a 2-core machine), and 0 failures allowed.

The gateway runs with API keys (so the 401s and `ignored_auth` are tested), small per-request
limits (the document's bounds must follow them), a short sync timeout (POST /v1/generate also
answers 202) and a small queue (429 happens).

One check is told more than the schema says: `positive_data_acceptance` also accepts 422 from
the three routes that take a GenerateRequest, which refuse, by design, what a JSON Schema cannot
express (a class beyond the model's card, sigma_min above sigma_max, seeds together with count,
settings whose schedule is not finite, an Idempotency-Key reused with another body).

Run it alone: `OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/service/test_openapi_fuzz.py -s`
(-s prints the counts).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.servers import RedisServer, spawn_worker, stack_env, start_gateway, wait_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "schemathesis-key"
SETTINGS = {"EDM_BUNDLED_MODEL": "true", "EDM_API_KEYS": KEY, "EDM_MAX_STEPS": 40, "EDM_MAX_IMAGES": 8,
            "EDM_SYNC_TIMEOUT_S": 1, "EDM_MAX_QUEUED_NFE": 2000}
MAX_EXAMPLES = 60  # per operation and phase; about a minute in all here
CONFIG = """
[[operations]]
include-path-regex = "^/(v1/generate|v1/jobs|ui/jobs)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]
"""


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("fuzz-logs")
    conn = redis_server.client()
    conn.flushdb()
    env = stack_env(redis_server.url, {}, **SETTINGS)
    worker = spawn_worker(env, logs / "worker.log")
    gateway, url = start_gateway(env, logs / "gateway.log")
    try:
        wait_worker(worker, conn)
        yield url
    finally:
        gateway.stop()
        worker.stop()
        conn.close()


def requests_served(url: str) -> int:
    """The gateway's own count of HTTP requests (edm_http_requests_total, every route and status)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("edm_http_requests_total{")))


def checks_run(ndjson: Path) -> tuple[int, int]:
    """(test cases, check results) from schemathesis's event log."""
    cases = checks = 0
    for line in ndjson.read_text().splitlines():
        event = json.loads(line).get("ScenarioFinished")
        if event is None:
            continue
        cases += len(event["recorder"].get("cases", {}))
        checks += sum(len(results) for results in event["recorder"].get("checks", {}).values())
    return cases, checks


def test_schemathesis_finds_nothing(gateway: str, tmp_path: Path) -> None:
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    before = requests_served(gateway)
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp_path / "schemathesis.toml"), "run",
         f"{gateway}/openapi.json", "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
         "--generation-deterministic", "--max-examples", str(MAX_EXAMPLES), "--workers", "1",
         "--header", f"Authorization: Bearer {KEY}", "--request-timeout", "30",
         "--report", "json,ndjson", "--report-dir", str(tmp_path), "--no-color"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    wall_s = time.monotonic() - started
    requests = requests_served(gateway) - before
    reports = {path.suffix: path for path in tmp_path.glob("*.*json")}
    assert set(reports) == {".json", ".ndjson"}, run.stdout[-5000:] + run.stderr[-5000:]
    report = json.loads(reports[".json"].read_text())
    cases, checks = checks_run(reports[".ndjson"])
    print(f"\nschemathesis {report['schemathesis_version']}: {requests} requests served, {cases} test cases, "
          f"{checks} check results, {len(report['failures'])} kinds of failure, {len(report['errors'])} errors "
          f"in {wall_s:.0f} s")
    assert run.returncode == 0 and not report["failures"] and not report["errors"], run.stdout[-30000:]
    assert report["operations"]["tested"] == report["operations"]["total"] == 10
    assert {name: phase["status"] for name, phase in report["phases"].items()} == dict.fromkeys(
        ("examples", "coverage", "fuzzing", "stateful"), "success"), run.stdout[-5000:]
    assert "API Links:" in run.stdout  # the stateful phase followed the document's links
