"""Helpers for the deployment tests: tool lookup, compose files (tags, interpolation, merge),
manifests, and the metric names the code really exports."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "edm-serve.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES_DIR = DEPLOY / "prometheus" / "rules"
K8S = DEPLOY / "k8s"
INSTALL_HINT = "run `bash deploy/ci-install.sh` to install it"


def missing(what: str) -> None:
    """Skip: the tool is not installed. Under CI (CI=true) that is a failure, never a skip."""
    message = f"{what} is not installed; {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must run these tests)")
    pytest.skip(message)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        venv_bin = Path(sys.executable).parent / name
        if venv_bin.exists():
            return str(venv_bin)
        missing(f"`{name}`")
    return str(path)


def require_module(name: str, package: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        missing(f"the Python package {package}")


# -- YAML ------------------------------------------------------------------------------------------

class Reset:
    """Compose's `!reset` tag: the key goes back to its default (removed) when merged."""

    def __init__(self, value: Any):
        self.value = value


class Override:
    """Compose's `!override` tag: the value replaces the base's instead of being merged."""

    def __init__(self, value: Any):
        self.value = value


def load_yaml(path: Path) -> Any:
    yaml = require_module("yaml", "PyYAML")

    class Loader(yaml.SafeLoader):  # type: ignore[name-defined]
        pass

    def construct(cls: type) -> Any:
        def build(loader: Any, node: Any) -> Any:
            if isinstance(node, yaml.MappingNode):
                return cls(loader.construct_mapping(node, deep=True))
            if isinstance(node, yaml.SequenceNode):
                return cls(loader.construct_sequence(node, deep=True))
            return cls(loader.construct_scalar(node))
        return build

    Loader.add_constructor("!reset", construct(Reset))
    Loader.add_constructor("!override", construct(Override))
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def load_all_yaml(path: Path) -> list[Any]:
    yaml = require_module("yaml", "PyYAML")
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def untag(value: Any) -> Any:
    """The document as the schema sees it: tags replaced by their values."""
    if isinstance(value, Reset | Override):
        return untag(value.value)
    if isinstance(value, dict):
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value


# -- compose ---------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose variable interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err},
    ${VAR:+alt}, and $$ for a literal dollar."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, Reset | Override):
        return type(value)(interpolate(value.value, env))
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        current = env.get(name)
        if op in (":-", "-"):
            unset = current is None or (op == ":-" and current == "")
            return arg if unset else str(current)
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise ValueError(f"required variable {name} is missing: {arg}")
            return str(current)
        if op in (":+", "+"):
            set_ = current is not None and (op == "+" or current != "")
            return arg if set_ else ""
        return "" if current is None else str(current)

    return _VAR.sub(replace, value)


_APPEND = {"ports", "expose", "volumes", "dns", "extra_hosts", "cap_add", "cap_drop", "env_file", "secrets",
           "configs"}


def merge(base: Any, override: Any, key: str = "") -> Any:
    """Merge an override file into a base model as `docker compose -f base -f override` does,
    for what these files use: mappings merge key by key, !reset removes, !override replaces,
    sequences of the listed keys append (unique), other sequences and scalars replace."""
    if isinstance(override, Override):
        return untag(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if isinstance(v, Reset):
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = untag(v)
        return out
    if isinstance(base, list) and isinstance(override, list) and key in _APPEND:
        return base + [v for v in untag(override) if v not in base]
    return untag(override)


def compose_model(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The effective model of `docker compose -f ... config` for these files, interpolated with
    `env` (default: nothing set, so every default applies)."""
    model: dict[str, Any] = {}
    for path in files:
        model = merge(model, load_yaml(path))
    return interpolate(model, env or {})


def compose_environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [item.split("=", 1) for item in env]
        return {p[0]: (p[1] if len(p) > 1 else None) for p in pairs}
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def env_value(service: dict[str, Any], key: str) -> str:
    """A variable the service's environment sets to a value (not a pass-through)."""
    value = compose_environment(service).get(key)
    assert value is not None, f"{key} has no value"
    return value


def container_ports(service: dict[str, Any]) -> set[int]:
    """Container-side ports a compose service publishes or exposes."""
    out = set()
    for entry in service.get("ports", []) + service.get("expose", []):
        if isinstance(entry, dict):
            out.add(int(entry["target"]))
        else:
            out.add(int(str(entry).split(":")[-1].split("/")[0]))
    return out


def redis_flags(args: list[str]) -> dict[str, str]:
    """`redis-server --name value ...` as {"--name": "value"}."""
    assert args[0] == "redis-server" and len(args) % 2 == 1, args
    return dict(zip(args[1::2], args[2::2], strict=True))


def memory_bytes(value: str | int, units: dict[str, int]) -> int:
    """'2gb', '3g', '3Gi' in bytes, with the unit table of the tool that reads it (below)."""
    number, unit = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", str(value)).groups()  # type: ignore[union-attr]
    return int(number) * units[unit]


# Redis (redis.conf): k/m/g are powers of 1000, kb/mb/gb of 1024 (any case). Docker: b/k/m/g of 1024.
# Kubernetes: Ki/Mi/Gi of 1024, k/M/G of 1000.
REDIS_UNITS = {u: m for unit, m in {"": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9,
                                    "gb": 2**30}.items() for u in (unit, unit.upper())}
DOCKER_UNITS = {u: m for unit, m in {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}.items()
                for u in (unit, unit.upper())}
K8S_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def compose_schema() -> dict[str, Any]:
    require_module("check_jsonschema", "check-jsonschema")
    import json
    from importlib import resources

    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    return json.loads(text)


def schema_errors(schema: dict[str, Any], document: Any) -> list[str]:
    jsonschema = require_module("jsonschema", "check-jsonschema (jsonschema)")
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


# -- the code's metrics ----------------------------------------------------------------------------

def exported_metric_names() -> set[str]:
    """Every sample name the gateway and worker registries export (counters as *_total, histograms
    as *_bucket/_sum/_count), from the real metric classes."""
    from contract.jobs import WorkerInfo
    from service.metrics import GatewayMetrics
    from worker.metrics import WorkerMetrics

    class FakeLedger:
        def queue_lengths(self, models: list[str]) -> dict[str, int]:
            return dict.fromkeys(models, 0)

        def queued_nfe(self) -> int:
            return 0

        def live_workers(self) -> list[WorkerInfo]:
            return []

    names: set[str] = set()
    gateway = GatewayMetrics(lambda: FakeLedger(), ["m"])  # type: ignore[arg-type, return-value]
    for registry in (gateway.registry, WorkerMetrics().registry):
        for family in registry.collect():
            if family.type == "counter":
                names |= {family.name + "_total", family.name + "_created"}
            elif family.type == "histogram":
                names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
            else:
                names.add(family.name)
    return names


METRIC = re.compile(r"\b(edm_[a-z0-9_]+)\b")


def metric_names_in(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query target, rows' nested panels included."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                out.append((panel.get("title", "?"), target))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


GRAFANA_VARS = re.compile(r"\$\{?(__rate_interval|__interval|__range|model)\}?")


def substitute(expr: str, *, rate_interval: str, range_: str, interval: str = "1s", model: str = ".*") -> str:
    """A panel query as Grafana sends it: its built-in and template variables replaced."""
    values = {"__rate_interval": rate_interval, "__interval": interval, "__range": range_, "model": model}
    out = GRAFANA_VARS.sub(lambda m: values[m.group(1)], expr)
    if "$" in out:
        raise AssertionError(f"unknown variable left in {out!r}")
    return out
