"""The Prometheus config and alert rules: promtool accepts them, and the scrape jobs find the
compose services on the ports those services really listen on."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deploy.helpers import (
    COMPOSE,
    PROMETHEUS_CONFIG,
    RULES_DIR,
    compose_model,
    env_value,
    exported_metric_names,
    load_yaml,
    metric_names_in,
    require_binary,
    require_module,
)


def test_promtool_accepts_the_config_and_its_rules() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check is real: a typo in a scrape config fails it."""
    promtool = require_binary("promtool")
    config = load_yaml(PROMETHEUS_CONFIG)
    config["scrape_configs"][0]["dns_sd_config"] = config["scrape_configs"][0].pop("dns_sd_configs")
    config.pop("rule_files")
    bad = tmp_path / "prometheus.yml"
    bad.write_text(require_module("yaml", "PyYAML").safe_dump(config))
    assert subprocess.run([promtool, "check", "config", str(bad)], capture_output=True).returncode != 0


def test_promtool_accepts_the_rules() -> None:
    promtool = require_binary("promtool")
    files = sorted(RULES_DIR.glob("*.yml"))
    assert files
    result = subprocess.run([promtool, "check", "rules", *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_jobs_find_every_compose_replica_on_its_real_port() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = compose_model(COMPOSE)["services"]
    expected = {
        "edm-gateway": ("gateway", int(env_value(services["gateway"], "EDM_PROBE_PORT"))),
        "edm-worker": ("worker", int(env_value(services["worker"], "EDM_METRICS_PORT"))),
    }
    for job_name, (service, port) in expected.items():
        [sd] = jobs[job_name]["dns_sd_configs"]
        assert sd["names"] == [service] and sd["type"] == "A" and sd["port"] == port, job_name
        assert jobs[job_name].get("metrics_path", "/metrics") == "/metrics"


def test_alert_rules_use_exported_metrics() -> None:
    exported = exported_metric_names()
    for path in RULES_DIR.glob("*.yml"):
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                unknown = metric_names_in(rule["expr"]) - exported
                assert not unknown, f"{rule.get('alert')}: {sorted(unknown)} are not exported by the code"
