"""docker-compose.yml and its CPU override: valid against the Compose Specification's JSON schema,
every referenced file exists, and the wiring (health, scaling, ports, settings) holds together.

The schema is the compose-spec one that check-jsonschema vendors (what `docker compose` v2
implements); the merge and interpolation of `docker compose -f a -f b config` are done by
tests/deploy/helpers.py for what these files use, !reset included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from tests.deploy.helpers import (
    COMPOSE,
    COMPOSE_CPU,
    DEPLOY,
    DOCKER_UNITS,
    REDIS_UNITS,
    ROOT,
    compose_environment,
    compose_model,
    compose_schema,
    container_ports,
    env_value,
    load_yaml,
    memory_bytes,
    redis_flags,
    schema_errors,
    untag,
)

# The one bind-mount source that need not exist: the operator's checkpoint folder, which Docker
# creates (empty) on first start when it is missing.
DATA_DIRS = {"./models"}
# Read by deploy/docker/worker-entrypoint.sh, not by the settings classes.
ENTRYPOINT_VARS = {"EDM_GPU_LOCK_DIR"}


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return compose_model(COMPOSE)


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return compose_model(COMPOSE, COMPOSE_CPU)


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of the service's bind mounts (short syntax)."""
    out = []
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_each_file_matches_the_compose_schema(path: Path) -> None:
    errors = schema_errors(compose_schema(), untag(load_yaml(path)))
    assert not errors, "\n".join(errors)


def test_the_merged_models_match_the_compose_schema(gpu: dict[str, Any], cpu: dict[str, Any]) -> None:
    schema = compose_schema()
    for name, model in (("gpu", gpu), ("cpu", cpu)):
        errors = schema_errors(schema, model)
        assert not errors, f"{name}:\n" + "\n".join(errors)


def test_the_schema_check_catches_mistakes(gpu: dict[str, Any]) -> None:
    """The check is not vacuous: a misspelled key and a wrong type are reported."""
    broken = {**gpu, "services": {**gpu["services"], "redis": {**gpu["services"]["redis"], "helthcheck": {}}}}
    assert any("helthcheck" in e for e in schema_errors(compose_schema(), broken))
    broken = {**gpu, "services": {**gpu["services"], "redis": {**gpu["services"]["redis"], "ports": "6379"}}}
    assert schema_errors(compose_schema(), broken)


def test_referenced_files_exist(gpu: dict[str, Any], cpu: dict[str, Any]) -> None:
    stages = dockerfile_stages(ROOT / "Dockerfile")
    for model in (gpu, cpu):
        for name, service in model["services"].items():
            build = service.get("build")
            if build is not None:
                context = ROOT / build.get("context", ".")
                dockerfile = context / build.get("dockerfile", "Dockerfile")
                assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
                assert build.get("target") in stages, f"{name}: no stage {build.get('target')!r} in {dockerfile}"
            for source, _ in bind_mounts(service):
                if source in DATA_DIRS:
                    continue
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_only_the_model_folder_may_be_missing(gpu: dict[str, Any]) -> None:
    sources = {source for service in gpu["services"].values() for source, _ in bind_mounts(service)}
    assert DATA_DIRS <= sources
    assert {s for s in sources if not (ROOT / s).exists()} <= DATA_DIRS


def test_models_come_from_a_mounted_volume(gpu: dict[str, Any]) -> None:
    for name in ("gateway", "worker"):
        mounts = dict(bind_mounts(gpu["services"][name]))
        assert mounts.get("./models") == "/models", name
        assert any(str(v).endswith(":ro") for v in gpu["services"][name]["volumes"] if str(v).startswith("./models"))
    custom = compose_model(COMPOSE, env={"EDM_MODELS_DIR": "/srv/checkpoints"})
    assert dict(bind_mounts(custom["services"]["worker"]))["/srv/checkpoints"] == "/models"


def test_services_wait_for_healthy_dependencies(gpu: dict[str, Any]) -> None:
    services = gpu["services"]
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert spec["condition"] == "service_healthy", f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency], f"{name} waits on {dependency}, which has no healthcheck"
    assert set(services["gateway"]["depends_on"]) == {"redis"}
    assert set(services["worker"]["depends_on"]) == {"redis"}
    assert set(services["grafana"]["depends_on"]) == {"prometheus"}
    assert all("healthcheck" in service for service in services.values())


def test_redis_persists_with_append_only_file(gpu: dict[str, Any], cpu: dict[str, Any]) -> None:
    for model in (gpu, cpu):
        redis = model["services"]["redis"]
        flags = redis_flags(redis["command"])
        assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "everysec"
        [volume] = [str(v) for v in redis["volumes"] if str(v).split(":")[1] == flags["--dir"]]
        assert volume.split(":")[0] in model["volumes"], "the append-only file must be on a named volume"


def test_redis_memory_is_bounded_and_never_evicts_jobs(gpu: dict[str, Any], cpu: dict[str, Any]) -> None:
    """maxmemory with noeviction (a full Redis refuses writes; it never drops a job or a result), inside a
    container memory limit with room for the fork that rewrites the append-only file."""
    for model in (gpu, cpu):
        redis = model["services"]["redis"]
        flags = redis_flags(redis["command"])
        assert flags["--maxmemory-policy"] == "noeviction"
        maxmemory = memory_bytes(flags["--maxmemory"], REDIS_UNITS)
        limit = memory_bytes(redis["deploy"]["resources"]["limits"]["memory"], DOCKER_UNITS)
        assert 1 << 30 <= maxmemory and maxmemory * 1.4 <= limit, (maxmemory, limit)


def test_gateway_publishes_rest_and_grpc(gpu: dict[str, Any]) -> None:
    gateway = gpu["services"]["gateway"]
    env = compose_environment(gateway)
    ports = {int(env_value(gateway, name)) for name in ("EDM_PORT", "EDM_GRPC_PORT", "EDM_PROBE_PORT")}
    assert container_ports(gateway) == ports == {8000, 8001, 50051}
    assert env["EDM_HOST"] == "0.0.0.0"
    assert f":{env['EDM_PROBE_PORT']}/healthz" in " ".join(gateway["healthcheck"]["test"])  # the probe port
    published = compose_model(COMPOSE, env={"GATEWAY_HTTP_PORT": "18000", "GATEWAY_GRPC_PORT": "15051"})
    assert published["services"]["gateway"]["ports"] == ["18000:8000", "15051:50051"]


def test_worker_can_be_scaled(gpu: dict[str, Any]) -> None:
    """`docker compose up --scale worker=N`: no fixed name, no host port, metrics port exposed."""
    worker = gpu["services"]["worker"]
    env = compose_environment(worker)
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    assert container_ports(worker) == {int(env_value(worker, "EDM_METRICS_PORT"))}
    assert f":{env['EDM_METRICS_PORT']}/metrics" in " ".join(worker["healthcheck"]["test"])


def test_worker_reserves_nvidia_gpus_and_shares_a_lock_volume(gpu: dict[str, Any]) -> None:
    worker = gpu["services"]["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == "all"
    env = compose_environment(worker)
    assert env["EDM_DEVICE"] == "cuda"
    lock_volumes = [str(v) for v in worker["volumes"] if str(v).split(":")[1] == env["EDM_GPU_LOCK_DIR"]]
    assert lock_volumes and lock_volumes[0].split(":")[0] in gpu["volumes"], "the GPU locks must be a shared volume"


def test_cpu_override_drops_the_gpu_and_changes_only_the_worker(gpu: dict[str, Any], cpu: dict[str, Any]) -> None:
    worker = cpu["services"]["worker"]
    assert "devices" not in worker.get("deploy", {}).get("resources", {}).get("reservations", {})
    assert worker["build"] == {"context": ".", "target": "worker-cpu"}
    env = compose_environment(worker)
    assert env["EDM_DEVICE"] == "cpu" and env["EDM_GPU_LOCK_DIR"] == ""
    assert env["EDM_REDIS_URL"] == compose_environment(gpu["services"]["worker"])["EDM_REDIS_URL"]
    assert worker["image"] != gpu["services"]["worker"]["image"]
    for name in gpu["services"]:
        if name != "worker":
            assert cpu["services"][name] == gpu["services"][name], name


def test_edm_variables_are_real_settings(gpu: dict[str, Any], cpu: dict[str, Any]) -> None:
    """Every EDM_* variable the compose files set is a field of the process's settings class."""
    from contract.settings import WorkerSettings
    from service.settings import GatewaySettings

    known = {"gateway": settings_vars(GatewaySettings), "worker": settings_vars(WorkerSettings) | ENTRYPOINT_VARS}
    for model in (gpu, cpu):
        for name, allowed in known.items():
            env = {k for k in compose_environment(model["services"][name]) if k.startswith("EDM_")}
            assert env <= allowed, f"{name}: not settings: {sorted(env - allowed)}"
    gateway_env = compose_environment(gpu["services"]["gateway"])
    worker_env = compose_environment(gpu["services"]["worker"])
    assert gateway_env["EDM_REDIS_URL"] == worker_env["EDM_REDIS_URL"] == "redis://redis:6379/0"


def test_optional_settings_pass_through_only_when_set() -> None:
    """A variable listed without a value is passed from the operator's shell or .env when set there,
    and absent otherwise (so its default applies); interpolated ones get their defaults."""
    raw = load_yaml(COMPOSE)
    env = raw["services"]["worker"]["environment"]
    assert env["EDM_MODELS"] is None and env["EDM_MAX_PASS_ROWS"] is None
    assert raw["services"]["gateway"]["environment"]["EDM_API_KEYS"] is None


def test_grafana_is_provisioned_from_deploy(gpu: dict[str, Any]) -> None:
    grafana = gpu["services"]["grafana"]
    mounts = dict(bind_mounts(grafana))
    provisioning = mounts["./deploy/grafana/provisioning"]
    dashboards_target = mounts["./deploy/grafana/dashboards"]
    assert provisioning == "/etc/grafana/provisioning"
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    [datasource] = datasources
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus"
    prometheus_port = container_ports(gpu["services"]["prometheus"]).pop()
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    [provider] = load_yaml(DEPLOY / "grafana/provisioning/dashboards/edm-serve.yml")["providers"]
    assert provider["options"]["path"] == dashboards_target
    home = compose_environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home is not None and home.startswith(dashboards_target + "/")
    assert (DEPLOY / "grafana/dashboards" / Path(home).name).is_file()


def test_prometheus_reads_the_config_and_rules_it_is_given(gpu: dict[str, Any]) -> None:
    prometheus = gpu["services"]["prometheus"]
    mounts = dict(bind_mounts(prometheus))
    config_target = mounts["./deploy/prometheus/prometheus.yml"]
    assert f"--config.file={config_target}" in prometheus["command"]
    config = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    rules_target = mounts["./deploy/prometheus/rules"]
    for pattern in config["rule_files"]:
        assert str(Path(config_target).parent / pattern).startswith(rules_target + "/")


def dockerfile_stages(path: Path) -> set[str]:
    stages = set()
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].upper() == "FROM" and parts[-2].upper() == "AS":
            stages.add(parts[-1])
    return stages


def settings_vars(cls: type[BaseSettings]) -> set[str]:
    prefix = cls.model_config.get("env_prefix", "")
    return {(prefix + name).upper() for name in cls.model_fields}
