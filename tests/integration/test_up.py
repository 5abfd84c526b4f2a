"""`edm-serve up`: Redis, a worker and the gateway from one command; Ctrl-C stops them all."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model.images import read_png_text
from service.up import free_port
from tests.integration.servers import ROOT, stack_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_up_serves_and_stops_cleanly_on_ctrl_c(tiny_model: Path) -> None:
    env = stack_env("unused", {"tiny": tiny_model})
    del env["EDM_REDIS_URL"]  # up starts its own Redis
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--port", str(port), "--metrics-port",
                             str(metrics_port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "edm-serve up exited:\n" + "".join(lines)
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        banner = "".join(lines)
        assert f"http://127.0.0.1:{port}" in banner
        redis_port = int(re.search(r"Redis\s+redis://127\.0\.0\.1:(\d+)", banner).group(1))
        response = httpx.post(f"http://127.0.0.1:{port}/v1/generate", timeout=60,
                              json={"seeds": [0], "class_label": 7, "num_steps": 4})
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert read_png_text(response.content)["edm:class_label"] == "7"
        assert "edm_images_total" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert not port_open(port) and not port_open(metrics_port) and not port_open(redis_port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
