"""deploy/k8s: the manifests parse, pass a strict schema check (kubernetes-validate, offline), and
use the same images, ports, commands and settings as the compose stack; KEDA watches the real
RQ queue key."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests.deploy.helpers import (
    COMPOSE,
    K8S,
    K8S_UNITS,
    REDIS_UNITS,
    compose_environment,
    compose_model,
    container_ports,
    load_all_yaml,
    load_yaml,
    memory_bytes,
    redis_flags,
    require_binary,
)

CORE_KINDS = {"Namespace", "ConfigMap", "PersistentVolumeClaim", "StatefulSet", "Deployment", "Service"}
# Compose-only: the GPU lock folder that gives each compose replica its own GPU (on Kubernetes the
# device plugin does that).
COMPOSE_ONLY = {"EDM_GPU_LOCK_DIR"}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out += load_all_yaml(path)
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_model(COMPOSE)["services"]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [c] = find(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    return c


def k8s_env(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", [])})
    return env


def test_manifests_parse_and_kustomization_lists_them(docs: list[dict[str, Any]]) -> None:
    assert {d["kind"] for d in docs} == CORE_KINDS | {"ScaledObject"}
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "edm-serve"
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_strict_schema_check_of_the_core_resources() -> None:
    validate = require_binary("kubernetes-validate")
    files = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name not in ("kustomization.yaml",
                                                                            "keda-scaledobject.yaml")]
    result = subprocess.run([validate, "--strict", "--quiet", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_same_images_commands_and_ports_as_compose(docs: list[dict[str, Any]], compose: dict[str, Any]) -> None:
    gateway = container(docs, "Deployment", "gateway")
    worker = container(docs, "Deployment", "worker")
    redis = container(docs, "StatefulSet", "redis")
    assert gateway["image"] == compose["gateway"]["image"] == "edm-serve-gateway:latest"
    assert worker["image"] == compose["worker"]["image"] == "edm-serve-worker:latest"
    assert redis["image"] == compose["redis"]["image"]
    assert gateway["args"] == compose["gateway"]["command"]
    assert worker["args"] == compose["worker"]["command"]
    assert redis["args"] == compose["redis"]["command"]
    assert {p["containerPort"] for p in gateway["ports"]} == container_ports(compose["gateway"]) == {8000, 8001, 50051}
    assert {p["containerPort"] for p in worker["ports"]} == container_ports(compose["worker"]) == {9101}
    service = find(docs, "Service", "gateway")
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 50051}
    assert {p["name"] for p in service["spec"]["ports"]} == {p["name"] for p in gateway["ports"]} - {"probes"}


def test_same_settings_as_compose(docs: list[dict[str, Any]], compose: dict[str, Any]) -> None:
    from contract.settings import WorkerSettings
    from service.settings import GatewaySettings

    for name, settings in (("gateway", GatewaySettings), ("worker", WorkerSettings)):
        env = k8s_env(docs, container(docs, "Deployment", name))
        fixed = {k: v for k, v in compose_environment(compose[name]).items()
                 if k.startswith("EDM_") and v is not None and k not in COMPOSE_ONLY}
        for key, value in fixed.items():
            assert env.get(key) == value, f"{name}: {key} is {env.get(key)!r} on k8s, {value!r} in compose"
        fields = {("EDM_" + f).upper() for f in settings.model_fields}
        assert {k for k in env if k.startswith("EDM_")} <= fields, f"{name}: unknown settings"
    redis_service = find(docs, "Service", "redis")
    assert k8s_env(docs, container(docs, "Deployment", "gateway"))["EDM_REDIS_URL"] == (
        f"redis://{redis_service['metadata']['name']}:{redis_service['spec']['ports'][0]['port']}/0")


def test_probes_use_the_health_endpoints(docs: list[dict[str, Any]]) -> None:
    gateway = container(docs, "Deployment", "gateway")
    probe_port = next(p["containerPort"] for p in gateway["ports"] if p["name"] == "probes")
    assert str(probe_port) == k8s_env(docs, gateway)["EDM_PROBE_PORT"]  # the port the gateway serves probes on
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"] == {"path": "/healthz", "port": "probes"}
    worker = container(docs, "Deployment", "worker")
    assert worker["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_worker_gets_a_gpu_and_time_to_drain(docs: list[dict[str, Any]]) -> None:
    worker = container(docs, "Deployment", "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = k8s_env(docs, worker)
    assert env["EDM_DEVICE"] == "cuda" and "EDM_GPU_LOCK_DIR" not in env
    pod = find(docs, "Deployment", "worker")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60


def test_keda_scales_the_worker_on_the_rq_queue_list(docs: list[dict[str, Any]]) -> None:
    from contract.ledger import Keys
    from model.bundled import DEFAULT_MODEL

    scaled = find(docs, "ScaledObject", "worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and find(docs, "Deployment", target["name"])
    assert 0 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    # The bundled model's card is named after its file (edm-serve train --name default).
    assert meta["listName"] == Keys.queue(DEFAULT_MODEL.stem) == "rq:queue:edm-digits-8x8-cond"
    assert int(meta["listLength"]) > 0
    redis = find(docs, "Service", "redis")
    host = f"redis.{redis['metadata']['namespace']}.svc.cluster.local"
    assert meta["address"] == f"{host}:{redis['spec']['ports'][0]['port']}"
    assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values must be strings"


def test_redis_is_durable_and_bounded_inside_its_pod(docs: list[dict[str, Any]]) -> None:
    """Append-only file on the PVC, noeviction under maxmemory, a memory limit with room for the
    rewrite's fork (requested in full), and a volume for the file and its rewrite."""
    redis = container(docs, "StatefulSet", "redis")
    flags = redis_flags(redis["args"])
    assert flags["--appendonly"] == "yes" and flags["--maxmemory-policy"] == "noeviction"
    maxmemory = memory_bytes(flags["--maxmemory"], REDIS_UNITS)
    resources = redis["resources"]
    limit = memory_bytes(resources["limits"]["memory"], K8S_UNITS)
    assert maxmemory * 1.4 <= limit == memory_bytes(resources["requests"]["memory"], K8S_UNITS)
    [mount] = [m for m in redis["volumeMounts"] if m["mountPath"] == flags["--dir"]]
    [claim] = [c for c in find(docs, "StatefulSet", "redis")["spec"]["volumeClaimTemplates"]
               if c["metadata"]["name"] == mount["name"]]
    assert memory_bytes(claim["spec"]["resources"]["requests"]["storage"], K8S_UNITS) >= 3 * maxmemory
