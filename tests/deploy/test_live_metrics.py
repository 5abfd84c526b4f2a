"""A real Prometheus (Debian's server) scrapes a real gateway and two real workers on loopback,
with deploy/prometheus/prometheus.yml and its alert rules (only the DNS discovery swapped for the
loopback ports, and a 1 s scrape interval). After some real requests, EVERY query of the Grafana
dashboard returns data through the Prometheus HTTP API: a renamed metric fails here, not on the
operator's screen."""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.up import free_port
from tests.deploy.helpers import (
    DASHBOARD,
    PROMETHEUS_CONFIG,
    RULES_DIR,
    dashboard_targets,
    load_yaml,
    require_binary,
    require_module,
    substitute,
)
from tests.integration.servers import (
    Process,
    RedisServer,
    spawn_worker,
    stack_env,
    start_gateway,
    wait_until,
    wait_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRAPE = "1s"
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval is at least: 4 scrapes (+ margin)


@dataclass
class Live:
    url: str  # the gateway
    prometheus: str
    worker_targets: list[str]
    gateway_target: str
    started: float
    logs: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self._api("/api/v1/query", {"query": expr})["result"]

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        return self._api("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})["result"]

    def _api(self, path: str, params: dict[str, Any]) -> Any:
        response = httpx.post(self.prometheus + path, data=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{params}: {body}"
        return body["data"]


def prometheus_config(gateway_port: int, worker_ports: list[int], own_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with static loopback targets instead of DNS discovery."""
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"].update(scrape_interval=SCRAPE, scrape_timeout=SCRAPE, evaluation_interval=SCRAPE)
    config["rule_files"] = [str(RULES_DIR / "*.yml")]
    targets = {"edm-gateway": [f"127.0.0.1:{gateway_port}"],
               "edm-worker": [f"127.0.0.1:{p}" for p in worker_ports],
               "prometheus": [f"127.0.0.1:{own_port}"]}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


@pytest.fixture(scope="module")
def live(redis_server: RedisServer, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    prometheus_bin = require_binary("prometheus")
    yaml = require_module("yaml", "PyYAML")
    logs = tmp_path_factory.mktemp("live")
    conn = redis_server.client()
    conn.flushdb()
    probe_port = free_port()  # Prometheus scrapes the gateway there, as deploy/prometheus/prometheus.yml does
    env = stack_env(redis_server.url, {"tiny": tiny_model}, EDM_PROBE_PORT=probe_port)
    worker_ports = [free_port(), free_port()]
    workers = [spawn_worker(env, logs / f"worker{k}.log", max_pass_rows=16, max_wait=0.05, metrics_port=port)
               for k, port in enumerate(worker_ports)]
    gateway, url = start_gateway(env, logs / "gateway.log")
    gateway_port = probe_port
    prom_port = free_port()
    config = logs / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(gateway_port, worker_ports, prom_port)))
    prometheus = Process([prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={logs / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                         {"PATH": "/usr/bin:/bin"}, logs / "prometheus.log")
    prom_url = f"http://127.0.0.1:{prom_port}"
    try:
        wait_until(lambda: _ready(prom_url), 30, prometheus, interval_s=0.2)
        for worker in workers:
            wait_worker(worker, conn)
        yield Live(url, prom_url, [f"127.0.0.1:{p}" for p in worker_ports], f"127.0.0.1:{gateway_port}",
                   time.time(), logs)
    finally:
        prometheus.stop()
        gateway.stop()
        codes = [worker.stop() for worker in workers]
        conn.close()
    assert codes == [0, 0], [w.output()[-2000:] for w in workers]


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/-/ready", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def generate_traffic(url: str, n: int = 12) -> int:
    """Concurrent sync requests (so batches hold several images), plus a few 4xx. Returns the
    number of successful generate requests."""
    bodies = [{"model": "tiny", "seeds": [3 * k, 3 * k + 1, 3 * k + 2], "class_label": k % 10, "num_steps": 6}
              for k in range(n)]
    with httpx.Client(base_url=url, timeout=60) as client:
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda b: client.post("/v1/generate", json=b,
                                                        headers={"Accept": "application/json"}).status_code, bodies))
        assert codes == [200] * len(bodies), codes
        assert client.post("/v1/generate", json={"model": "nope", "seeds": [0]}).status_code == 404
        assert client.post("/v1/generate", json={"model": "tiny", "seeds": [-1]}).status_code == 422
        assert client.get("/v1/jobs/does-not-exist").status_code in (404, 422)
    return len(bodies)


@pytest.fixture(scope="module")
def traffic_end(live: Live) -> float:
    """Send the traffic once all targets are up; return when Prometheus has scraped its effects."""
    wait_until(lambda: _targets_up(live), 30, interval_s=0.5)
    # A first round creates the labelled series (the code creates them on first use), so that
    # rate() sees the increments of the main round: a series' first sample has no predecessor.
    warm = generate_traffic(live.url, n=2)
    wait_until(lambda: _scalar(live, "sum(edm_jobs_total{outcome='succeeded'})") >= warm, 30, interval_s=0.5)
    time.sleep(2)
    ok = warm + generate_traffic(live.url)
    # Until Prometheus has scraped the workers and the gateway after the last request.
    wait_until(lambda: _scalar(live, "sum(edm_generate_latency_seconds_count)") >= ok
               and _scalar(live, "sum(edm_jobs_total{outcome='succeeded'})") >= ok, 30, interval_s=0.5)
    time.sleep(2)  # two more scrapes, so every rate window ends after the traffic
    return time.time()


def test_every_dashboard_query_returns_data(live: Live, traffic_end: float) -> None:
    end = traffic_end
    range_ = f"{math.ceil(end - live.started) + 5}s"
    dashboard = json.loads(DASHBOARD.read_text())
    empty = []
    checked = 0
    for title, target in dashboard_targets(dashboard):
        expr = substitute(target["expr"], rate_interval=RATE_INTERVAL, range_=range_, interval=SCRAPE)
        if target.get("instant"):
            result = live.query(expr)
            values = [float(series["value"][1]) for series in result]
        else:
            result = live.query_range(expr, live.started, end)
            values = [float(v) for series in result for _, v in series["values"]]
        checked += 1
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title} [{target['refId']}]: {expr}")
    assert checked == len(dashboard_targets(dashboard)) >= 20
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_per_worker_panels_show_each_worker(live: Live, traffic_end: float) -> None:
    instances = {s["metric"]["instance"] for s in live.query("max by (instance) (edm_model_load_seconds)")}
    assert instances == set(live.worker_targets)
    rows = live.query("sum by (instance) (edm_nfe_total)")
    assert {s["metric"]["instance"] for s in rows} <= set(live.worker_targets)


def test_the_model_variable_lists_the_served_models(live: Live) -> None:
    response = httpx.get(live.prometheus + "/api/v1/label/model/values", params={"match[]": "edm_queued_jobs"})
    assert response.json()["data"] == ["tiny"]


def test_alert_rules_evaluate_without_errors(live: Live) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(live.prometheus + "/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule.get("lastEvaluation", "").startswith("2") and
                                      not rule["lastEvaluation"].startswith("0001") for rule in rules) else None

    rules = wait_until(evaluated, 30, interval_s=0.5)
    expected = {rule["alert"] for path in RULES_DIR.glob("*.yml") for group in load_yaml(path)["groups"]
                for rule in group["rules"]}
    assert {rule["name"] for rule in rules} == expected
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = {rule["name"] for rule in rules if rule["state"] == "firing"}
    assert not firing & {"EdmRedisUnreachable", "EdmNoLiveWorker"}


def _targets_up(live: Live) -> bool:
    active = httpx.get(live.prometheus + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    health = {t["labels"]["instance"]: t["health"] for t in active}
    wanted = [live.gateway_target, *live.worker_targets]
    return all(health.get(instance) == "up" for instance in wanted)


def _scalar(live: Live, expr: str) -> float:
    result = live.query(expr)
    return float(result[0]["value"][1]) if result else 0.0


def test_prometheus_is_a_real_server() -> None:
    """Guard against a stand-in: the binary is Prometheus 2.x."""
    out = subprocess.run([require_binary("prometheus"), "--version"], capture_output=True, text=True)
    assert "prometheus, version 2." in (out.stdout + out.stderr)
