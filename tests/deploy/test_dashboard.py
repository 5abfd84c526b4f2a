"""The Grafana dashboard, statically: every panel the issue asks for is there, every query names
metrics the code really exports and uses $__rate_interval. (test_live_metrics.py runs the queries
against a real Prometheus.)"""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.helpers import DASHBOARD, dashboard_targets, exported_metric_names, metric_names_in, substitute


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_every_query_names_exported_metrics(dashboard: dict) -> None:
    exported = exported_metric_names()
    targets = dashboard_targets(dashboard)
    assert len(targets) >= 20
    for title, target in targets:
        names = metric_names_in(target["expr"])
        assert names, f"{title}: no edm_* metric in {target['expr']!r}"
        assert names <= exported, f"{title}: {sorted(names - exported)} are not exported by the code"


def test_rates_use_the_rate_interval(dashboard: dict) -> None:
    for title, target in dashboard_targets(dashboard):
        for window in re.findall(r"\b(?:rate|irate|increase|avg_over_time)\([^\[]*\[([^\]]+)\]", target["expr"]):
            assert window in ("$__rate_interval", "$__range"), f"{title}: fixed window [{window}]"


def test_queries_use_only_known_variables(dashboard: dict) -> None:
    for _, target in dashboard_targets(dashboard):
        substitute(target["expr"], rate_interval="1m", range_="1h")


def test_the_panels_the_issue_lists(dashboard: dict) -> None:
    by_metric: dict[str, list[str]] = {}
    for title, target in dashboard_targets(dashboard):
        for name in metric_names_in(target["expr"]):
            by_metric.setdefault(name, []).append(title)
    titles = {title for title, _ in dashboard_targets(dashboard)}
    wanted = {
        "Request rate by status": "edm_http_requests_total",
        "Errors by status and route": "edm_http_requests_total",
        "End-to-end latency (POST /v1/generate)": "edm_generate_latency_seconds_bucket",
        "Queue wait": "edm_queue_wait_seconds_bucket",
        "Queued jobs": "edm_queued_jobs",
        "Queued NFE": "edm_queued_nfe",
        "Rows per forward pass (used and padded)": "edm_pass_rows_sum",
        "Forward passes/s per worker": "edm_passes_total",
        "Admission wait and pass-loop wait": "edm_admission_wait_seconds_bucket",
        "Images in the slot tables": "edm_slot_rows_used",
        "NFE/s per worker": "edm_nfe_total",
        "Images/s per worker": "edm_images_total",
        "Worker busy fraction": "edm_pass_seconds_sum",
        "Model load time": "edm_model_load_seconds",
    }
    for title, metric in wanted.items():
        assert title in titles, f"no panel {title!r}"
        assert title in by_metric.get(metric, []), f"{title!r} does not query {metric}"
    latency = [t["expr"] for title, t in dashboard_targets(dashboard) if title.startswith("End-to-end latency")]
    assert {q for e in latency for q in re.findall(r"histogram_quantile\((0\.\d+)", e)} >= {"0.5", "0.95", "0.99"}


def test_datasource_and_model_variable(dashboard: dict) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["allValue"] == ".*" and "edm_queued_jobs" in variables["model"]["definition"]
    uids = {json.dumps(t["datasource"]) for _, t in dashboard_targets(dashboard)}
    assert uids == {json.dumps({"type": "prometheus", "uid": "${datasource}"})}
    assert dashboard["uid"] == "edm-serve"
