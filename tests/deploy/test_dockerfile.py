"""The Dockerfile without a Docker engine: hadolint, the stages and what each final image promises
(non-root, HEALTHCHECK, gateway without torch), the build context, and the build helper scripts."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.helpers import COMPOSE, ROOT, compose_environment, compose_model, require_binary

DOCKERFILE = ROOT / "Dockerfile"
TARGETS = ("gateway", "worker", "worker-cpu")


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM included)."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            parts = rest.split()
            name = parts[-1] if len(parts) >= 3 and parts[-2].upper() == "AS" else f"stage{len(out)}"
            current = out.setdefault(name, [])
        current.append((keyword, rest))
    return out


def test_hadolint_is_clean() -> None:
    hadolint = require_binary("hadolint")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_exist_and_run_as_non_root_with_a_healthcheck() -> None:
    found = stages()
    for target in TARGETS:
        assert target in found, f"no stage {target!r}"
        body = found[target]
        users = [rest for keyword, rest in body if keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{target} runs as root"
        healthchecks = [rest for keyword, rest in body if keyword == "HEALTHCHECK"]
        assert healthchecks and "NONE" not in healthchecks[-1].upper(), f"{target} has no HEALTHCHECK"
        assert any(keyword in ("CMD", "ENTRYPOINT") for keyword, _ in body)


def test_compose_builds_the_targets_and_uses_their_commands() -> None:
    model = compose_model(COMPOSE)
    found = stages()
    for service in ("gateway", "worker"):
        spec = model["services"][service]
        body = found[spec["build"]["target"]]
        cmd = [rest for keyword, rest in body if keyword == "CMD"][-1]
        assert cmd.replace(" ", "") == str(spec["command"]).replace("'", '"').replace(" ", "")


def test_gateway_image_has_no_torch_and_the_worker_keeps_the_base_torch() -> None:
    found = stages()
    gateway_chain = found["gateway-build"] + found["gateway"]
    text = " ".join(rest for keyword, rest in gateway_chain if keyword != "LABEL")
    assert "torch" not in text.lower() and "--extra model" not in text
    worker = " ".join(rest for _, rest in found["worker"])
    assert "--extra model --exclude torch" in worker
    assert found["worker"][0][1].split()[0] == "${CUDA_TORCH_IMAGE}"
    script = ROOT / "deploy/docker/requirements.py"
    base = run_py(script, "pyproject.toml").split()
    model = run_py(script, "pyproject.toml", "--extra", "model", "--exclude", "torch").split()
    assert not any(r.startswith("torch") for r in base + model)
    assert any(r.startswith("fastapi") for r in base) and any(r.startswith("scikit-learn") for r in model)
    assert set(base) < set(model)


def test_images_listen_where_compose_and_k8s_expect() -> None:
    found = stages()
    gateway_env = " ".join(rest for keyword, rest in found["gateway"] if keyword == "ENV")
    compose_gateway = compose_environment(compose_model(COMPOSE)["services"]["gateway"])
    for name in ("EDM_HOST", "EDM_PORT", "EDM_PROBE_PORT", "EDM_GRPC_PORT"):
        assert f"{name}={compose_gateway[name]}" in gateway_env
    exposed = {rest for keyword, rest in found["gateway"] if keyword == "EXPOSE"}
    assert exposed == {" ".join(compose_gateway[name] for name in ("EDM_PORT", "EDM_PROBE_PORT", "EDM_GRPC_PORT"))}
    for target in ("worker", "worker-cpu"):
        env = " ".join(rest for keyword, rest in found[target] if keyword == "ENV")
        assert "EDM_METRICS_PORT=9101" in env
        assert {rest for keyword, rest in found[target] if keyword == "EXPOSE"} == {"9101"}


def test_copied_files_exist_and_are_in_the_build_context() -> None:
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for keyword, rest in instructions():
        if keyword != "COPY" or "--from=" in rest:
            continue
        args = [a for a in rest.split() if not a.startswith("--")]
        for source in args[:-1]:
            if source == ".":
                continue
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert not ignored(source, ignore), f"COPY {source}: excluded by .dockerignore"
    for needed in ("pyproject.toml", "README.md", "Makefile", "model", "service", "worker", "proto",
                   "deploy/docker/gen-proto.sh", "deploy/docker/check-install.py"):
        assert not ignored(needed, ignore), f"{needed} is excluded by .dockerignore but the build needs it"
    for heavy in (".venv", ".git", "out", "models", "tests"):
        assert ignored(heavy, ignore), f"{heavy} should stay out of the build context"


def test_gen_proto_is_a_no_op_without_proto_files(tmp_path: Path) -> None:
    (tmp_path / "proto" / "edm" / "v1").mkdir(parents=True)
    result = subprocess.run(["sh", str(ROOT / "deploy/docker/gen-proto.sh"), str(tmp_path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "no .proto files" in result.stdout
    assert not (tmp_path / "service").exists()


def test_check_install_accepts_this_worker_environment() -> None:
    """The build's post-install check, run here on the dev venv (which has torch): the worker kind."""
    result = subprocess.run([sys.executable, str(ROOT / "deploy/docker/check-install.py"), "worker", str(ROOT)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker image OK" in result.stdout


@pytest.mark.parametrize("path", ["deploy/docker/worker-entrypoint.sh", "deploy/docker/gen-proto.sh",
                                  "deploy/ci-install.sh"])
def test_scripts_parse_and_are_executable(path: str) -> None:
    file = ROOT / path
    assert file.stat().st_mode & 0o111, f"{path} is not executable"
    shell = "bash" if file.read_text().startswith("#!/usr/bin/env bash") else "sh"
    subprocess.run([shell, "-n", str(file)], check=True)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` (or a parent folder of it) out; enough for its patterns."""
    parts = Path(path).parts
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").lstrip("/")
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern) or fnmatch.fnmatch(candidate, pattern.replace("**/", "")):
                excluded = not negate
    return excluded


def run_py(script: Path, *args: str) -> str:
    return subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, text=True,
                          cwd=ROOT).stdout
