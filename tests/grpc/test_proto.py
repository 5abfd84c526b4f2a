"""The contract: stubs are what `make proto` generates from proto/ today, the proto follows buf's
STANDARD style, proto/ is no Python package, and the metric lists every method."""

from __future__ import annotations

import filecmp
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from service.grpc.stubs import SERVICE_NAME, job_pb2, service_pb2
from service.metrics import GRPC_METHODS, GatewayMetrics
from tests.integration.servers import ROOT

GENERATED = ROOT / "service" / "grpc_gen"
FILES = (job_pb2.DESCRIPTOR, service_pb2.DESCRIPTOR)
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
LOWER_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def test_the_stubs_are_what_make_proto_generates_from_the_proto_now(tmp_path: Path) -> None:
    """Catches a .proto edited without `make proto` (the stubs are generated, never committed)."""
    out = tmp_path / "grpc_gen"
    subprocess.run(["make", "-s", "proto", f"GRPC_GEN={out}", f"BIN={Path(sys.executable).parent}"], cwd=ROOT,
                   check=True, capture_output=True, timeout=120)
    fresh = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    present = sorted(p.relative_to(GENERATED) for p in GENERATED.rglob("*") if p.is_file() and "__pycache__" not in
                     p.parts)
    assert fresh == present, "stale stubs: run `make proto`"
    stale = [str(p) for p in fresh if not filecmp.cmp(out / p, GENERATED / p, shallow=False)]
    assert not stale, f"stale stubs {stale}: run `make proto`"
    assert "from service.grpc_gen.edm.v1 import job_pb2" in (out / "edm/v1/generation_service_pb2.py").read_text()


def test_generated_code_is_ignored_and_proto_is_no_package() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", "service/grpc_gen/edm/v1/job_pb2.py"], cwd=ROOT)
    assert ignored.returncode == 0, "service/grpc_gen/ must be gitignored (it is generated)"
    assert not list((ROOT / "proto").rglob("*.py"))
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert not any(pattern.startswith("proto") for pattern in packages["include"])


def test_buf_standard_style() -> None:
    for file in FILES:
        assert file.package == "edm.v1" and file.name.startswith("edm/v1/")
        assert LOWER_SNAKE.match(Path(file.name).stem)
        for enum in file.enum_types_by_name.values():
            assert PASCAL.match(enum.name)
            prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
            assert enum.values_by_number[0].name == prefix + "UNSPECIFIED", enum.name
            assert all(v.name.startswith(prefix) and UPPER_SNAKE.match(v.name) for v in enum.values), enum.name
        for message in file.message_types_by_name.values():
            assert PASCAL.match(message.name)
            assert all(LOWER_SNAKE.match(f.name) for f in message.fields), message.name
            real_oneofs = [o for o in message.oneofs if not o.name.startswith("_")]  # not those of `optional`
            assert all(LOWER_SNAKE.match(o.name) for o in real_oneofs), message.name
    service = service_pb2.DESCRIPTOR.services_by_name["GenerationService"]
    assert service.name.endswith("Service") and SERVICE_NAME == "edm.v1.GenerationService"
    messages = []
    for method in service.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"
        messages += [method.input_type.name, method.output_type.name]
    assert len(messages) == len(set(messages))
    assert {m.name for m in service.methods} >= {"Generate", "GenerateStream", "GetJob", "CancelJob", "ListModels"}


def test_the_metric_knows_every_method() -> None:
    service = service_pb2.DESCRIPTOR.services_by_name["GenerationService"]
    assert set(GRPC_METHODS) == {f"{SERVICE_NAME}/{m.name}" for m in service.methods}
    metrics = GatewayMetrics(lambda: None, [])
    samples = {(s.labels["method"], s.labels["code"]) for family in metrics.registry.collect()
               if family.name == "edm_grpc_requests" for s in family.samples if s.name.endswith("_total")}
    assert samples == {(m, "OK") for m in GRPC_METHODS}


@pytest.mark.parametrize(("modules", "unwanted"), [("service.client", "torch, fastapi"),
                                                   ("service.grpc.server, service.routes.events", "torch")])
def test_no_torch_in_the_client_or_the_gateway_grpc_server(modules: str, unwanted: str) -> None:
    probe = f"import sys, {modules}; print(sorted(m for m in ({unwanted!r}).split(', ') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
