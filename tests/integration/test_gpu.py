"""Workers on CUDA: every precision runs, and fp32/bf16 images equal `edm-serve sample` on the same GPU."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.images import decode_png, read_png_text
from tests.integration.servers import ROOT, RedisServer, spawn_worker, stack_env, start_gateway, wait_worker

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_worker_matches_the_cli_on_the_same_gpu(dtype: str, redis_server: RedisServer, tiny_model: Path,
                                                     tmp_path: Path) -> None:
    conn = redis_server.client()
    conn.flushdb()
    env = stack_env(redis_server.url, {"tiny": tiny_model})
    worker = spawn_worker(env, tmp_path / "worker.log", device="cuda", dtype=dtype)
    gateway, url = start_gateway(env, tmp_path / "gateway.log")
    try:
        wait_worker(worker, conn)
        response = httpx.post(url + "/v1/generate", json={"seeds": list(range(8)), "class_label": 3},
                              headers={"Accept": "application/json"}, timeout=120)
        assert response.status_code == 200, response.text
        out = tmp_path / "cli"
        subprocess.run([sys.executable, "-m", "service.cli", "sample", "--model", str(tiny_model), "--seeds", "0-7",
                        "--class", "3", "--outdir", str(out), "--device", "cuda", "--dtype", dtype], check=True,
                       cwd=ROOT, env={**os.environ, **env}, capture_output=True)
        for image in response.json()["images"]:
            png = base64.b64decode(image["png_base64"])
            assert read_png_text(png)["edm:dtype"] == dtype
            reference = decode_png((out / f"{image['seed']:06d}.png").read_bytes())
            np.testing.assert_array_equal(decode_png(png), reference)
    finally:
        gateway.stop()
        assert worker.stop() == 0
        conn.close()
