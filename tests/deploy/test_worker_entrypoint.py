"""deploy/docker/worker-entrypoint.sh: each replica of a scaled worker service gets a GPU of its own.

A fake nvidia-smi reports the GPUs; the replicas are shell commands that print the
CUDA_VISIBLE_DEVICES the entry point gave them and hold their lock for a while.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy.helpers import ROOT, require_binary

ENTRYPOINT = ROOT / "deploy/docker/worker-entrypoint.sh"
HOLD = "echo gpu=${CUDA_VISIBLE_DEVICES:-none}; sleep 3"


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    require_binary("flock")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nfor i in 0 1; do echo \"GPU $i: Fake GPU (UUID: GPU-$i)\"; done\n")
    smi.chmod(0o755)
    out = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "EDM_DEVICE")}
    out.update(PATH=f"{bin_dir}:{os.environ['PATH']}", EDM_DEVICE="cuda", EDM_GPU_LOCK_DIR=str(tmp_path / "locks"))
    return out


def start(env: dict[str, str], command: str = HOLD) -> subprocess.Popen[str]:
    return subprocess.Popen(["sh", str(ENTRYPOINT), "sh", "-c", command], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def gpu_of(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("gpu="), line
    return line.removeprefix("gpu=")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for the replica; its exit code and standard error (pipes closed)."""
    _, err = proc.communicate(timeout=10)
    return proc.returncode, err


def test_replicas_take_distinct_gpus_then_share(env: dict[str, str]) -> None:
    first, second = start(env), start(env)
    try:
        assert {gpu_of(first), gpu_of(second)} == {"0", "1"}
        third = start(env)
        assert gpu_of(third) in {"0", "1"}
        assert "sharing GPU" in finish(third)[1]
    finally:
        for proc in (first, second):
            finish(proc)


def test_a_finished_replica_frees_its_gpu(env: dict[str, str]) -> None:
    holder = start(env)
    taken = gpu_of(holder)
    quick = start(env, "echo gpu=${CUDA_VISIBLE_DEVICES:-none}")
    other = gpu_of(quick)
    finish(quick)
    assert other != taken
    again = start(env, "echo gpu=${CUDA_VISIBLE_DEVICES:-none}")
    assert gpu_of(again) == other  # the lock died with the process that held it
    assert "runs on GPU" in finish(again)[1]
    finish(holder)


@pytest.mark.parametrize("change", [{"EDM_DEVICE": "cpu"}, {"EDM_DEVICE": "cuda:1"}, {"EDM_GPU_LOCK_DIR": ""},
                                    {"CUDA_VISIBLE_DEVICES": "3"}])
def test_left_alone_unless_asked(env: dict[str, str], change: dict[str, str]) -> None:
    proc = start({**env, **change}, "echo gpu=${CUDA_VISIBLE_DEVICES:-none}")
    assert gpu_of(proc) == change.get("CUDA_VISIBLE_DEVICES", "none")
    assert finish(proc)[0] == 0


def test_exit_code_and_arguments_pass_through(env: dict[str, str]) -> None:
    started = time.monotonic()
    result = subprocess.run(["sh", str(ENTRYPOINT), "sh", "-c", 'echo "$0 $1"; exit 7', "a b", "c"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 7 and result.stdout.strip() == "a b c"
    assert time.monotonic() - started < 5
