"""The allocator setting that the worker and `edm-serve sample` make: forward passes stop faulting
their activations' pages in anew. Each arm runs in a fresh process (the setting is process-wide)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PASSES = """
import json, resource, sys
import torch
torch.set_num_threads(1)
from model.allocator import reuse_freed_memory
from model.checkpoint import load_model
reused = reuse_freed_memory() if sys.argv[1] == "reuse" else None
net = load_model("model/bundled/edm-digits-8x8-cond.json").net
rows = 64
x = torch.randn(rows, net.img_channels, net.img_resolution, net.img_resolution, dtype=torch.float64)
sigma = torch.full((rows,), 2.5, dtype=torch.float64)
labels = torch.eye(net.label_dim)[torch.arange(rows) % net.label_dim]
with torch.no_grad():
    for _ in range(3):  # warm-up: the heap grows to the working set
        net(x, sigma, labels)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x, sigma, labels)
print(json.dumps({"reused": reused, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def faults(arm: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PASSES, arm], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")
def test_forward_passes_reuse_freed_memory_instead_of_faulting_it_in_again() -> None:
    default, reused = faults("default"), faults("reuse")
    assert reused["reused"] is True
    assert default["faults"] > 1000  # glibc's defaults: each pass maps its activations anew
    assert reused["faults"] * 20 < default["faults"], (default, reused)
