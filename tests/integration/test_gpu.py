"""Workers on CUDA: every precision runs, and an image served amid mixed traffic (so its passes have
different row counts and neighbours) equals `edm-serve sample` of its seed alone on the same GPU: the
worker and the CLI run the same slot engine with the same pass sizes."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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
        bodies = [{"seeds": [k, 100 + k], "class_label": 3, "num_steps": 6 + 3 * k,
                   **({"S_churn": 40, "S_min": 0.05, "S_max": 50, "S_noise": 1.003} if k % 2 else {})}
                  for k in range(6)] + [{"seeds": list(range(200, 240)), "class_label": 3, "num_steps": 12}]
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda body: httpx.post(url + "/v1/generate", json=body, timeout=300,
                                                              headers={"Accept": "application/json"}), bodies))
        for body, response in zip(bodies, responses, strict=True):
            assert response.status_code == 200, response.text
            for image in response.json()["images"][:3]:
                png = base64.b64decode(image["png_base64"])
                meta = read_png_text(png)
                assert meta["edm:dtype"] == dtype and meta["edm:pass_sizes"] == "8,16,32,64"
                out = tmp_path / f"cli-{image['seed']}"
                options = [f"--{name}={value}" for name, value in body.items() if name not in ("seeds", "class_label")]
                subprocess.run([sys.executable, "-m", "service.cli", "sample", "--model", str(tiny_model),
                                "--seeds", str(image["seed"]), "--class", "3", "--outdir", str(out), "--device",
                                "cuda", "--dtype", dtype, *[o.replace("num_steps", "steps") for o in options]],
                               check=True, cwd=ROOT, env={**os.environ, **env}, capture_output=True)
                alone = decode_png((out / f"{image['seed']:06d}.png").read_bytes())
                np.testing.assert_array_equal(decode_png(png), alone)
    finally:
        gateway.stop()
        assert worker.stop() == 0
        conn.close()
