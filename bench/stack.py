"""Helpers of bench/service.py: a service stack per arm, the in-process sampler, worker metrics.

A `Stack` is one full service as child processes: its own Redis, one worker (EDM_SCHEDULER =
`request` or `step`) and one gateway, logs in a temporary folder (kept after the run). Several
stacks can be alive at once; an idle one only waits on Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p95/p99 (nearest rank) and the count; NaN when there are no samples."""
    ordered = sorted(samples)
    if not ordered:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "n": 0}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "n": len(ordered)}


class InProcess:
    """The sampler called directly (model.generate.generate), on one thread, in this process, with the
    allocator set as the worker sets it."""

    def __init__(self, model: Path, steps: int, device: str, dtype: str):
        import torch

        from model.allocator import reuse_freed_memory
        from model.checkpoint import load_model
        from model.generate import SamplerSettings, generate
        from worker.engine import DTYPES

        torch.set_num_threads(1)
        reuse_freed_memory()  # as the worker and `edm-serve sample` do
        self.net = load_model(model, device=device).net
        if dtype != "auto":
            self.net.compute_dtype = DTYPES[dtype]
        self.settings = SamplerSettings(num_steps=steps)
        self.generate = generate
        self.run([0])  # warm-up

    def run(self, seeds: list[int]) -> float:
        """Seconds to sample these seeds (random classes, as the service does without class_label)."""
        started = time.perf_counter()
        self.generate(self.net, seeds, [None] * len(seeds), self.settings)
        return time.perf_counter() - started


# The worker metrics that explain a workload: counters and histogram sums/counts, summed over labels.
WORKER_SERIES = ("edm_passes_total", "edm_pass_rows_sum", "edm_pass_padded_rows_total", "edm_pass_seconds_sum",
                 "edm_pass_loop_wait_seconds_total", "edm_images_total", "edm_nfe_total",
                 "edm_admission_wait_seconds_sum", "edm_admission_wait_seconds_count", "edm_worker_busy")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (or of one of its threads), from /proc; 0 if gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

CPU_SERIES = ("cpu_worker_main_s", "cpu_worker_threads_s", "cpu_gateway_s", "cpu_redis_s", "cpu_bench_client_s")


class Stack:
    """Redis + worker + gateway for one scheduler. `start()` returns at once; `wait_ready()` blocks."""

    def __init__(self, model: Path, scheduler: str, *, max_pass_rows: int, max_wait: float, device: str,
                 dtype: str, max_images: int):
        self.scheduler = scheduler
        self.model, self.max_pass_rows, self.max_wait = model, max_pass_rows, max_wait
        self.device, self.dtype, self.max_images = device, dtype, max_images
        self.tmp = Path(tempfile.mkdtemp(prefix=f"edm-bench-{scheduler}-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis: subprocess.Popen[bytes] | None = None

    def start(self) -> Stack:
        from service.up import free_port, start_redis

        redis_port, self.port, self.metrics_port = free_port(), free_port(), free_port()
        self.redis = start_redis(redis_port, self.tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "EDM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
               "EDM_BUNDLED_MODEL": "false", "EDM_MODELS": json.dumps({"bench": str(self.model)}),
               "EDM_SCHEDULER": self.scheduler, "EDM_MAX_PASS_ROWS": str(self.max_pass_rows),
               "EDM_MAX_WAIT_S": str(self.max_wait), "EDM_METRICS_PORT": str(self.metrics_port),
               "EDM_DEVICE": self.device, "EDM_DTYPE": self.dtype, "EDM_LOG_LEVEL": "WARNING",
               # the load generator, not the gateway's limits, decides how much work is in flight:
               "EDM_MAX_IMAGES": str(self.max_images), "EDM_MAX_QUEUED_NFE": str(10**9),
               "EDM_SYNC_TIMEOUT_S": "900"}
        cli = [sys.executable, "-m", "service.cli"]
        for name, extra in (("worker", []), ("gateway", ["--port", str(self.port)])):
            log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 (the child holds it)
            self.procs.append(subprocess.Popen([*cli, name, *extra], env=env, cwd=ROOT, stdout=log, stderr=log))
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def wait_ready(self, timeout_s: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(proc.poll() is not None for proc in self.procs):
                break
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.scheduler} stack not ready; logs in {self.tmp}")

    def metrics(self) -> dict[str, float]:
        """The worker's WORKER_SERIES now (Prometheus text format, summed over label sets)."""
        import httpx

        totals = dict.fromkeys(WORKER_SERIES, 0.0)
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
        return totals | self.cpu()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: the worker's main (pass loop) thread, its other threads (writer,
        heartbeat, listeners), the gateway, Redis."""
        worker, gateway = (proc.pid for proc in self.procs)
        worker_all, worker_main = cpu_seconds(worker), cpu_seconds(worker, worker)
        return {"cpu_worker_main_s": worker_main, "cpu_worker_threads_s": worker_all - worker_main,
                "cpu_gateway_s": cpu_seconds(gateway), "cpu_redis_s": cpu_seconds(self.redis.pid) if self.redis else 0}

    def wait_idle(self, timeout_s: float) -> bool:
        """Until the worker holds no images (edm_worker_busy 0 twice in a row), at most timeout_s."""
        deadline, quiet = time.monotonic() + timeout_s, 0
        while time.monotonic() < deadline:
            quiet = quiet + 1 if self.metrics()["edm_worker_busy"] == 0 else 0
            if quiet >= 2:
                return True
            time.sleep(0.2)
        return False

    def close(self) -> None:
        for proc in [*reversed(self.procs), *([self.redis] if self.redis else [])]:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def metrics_delta(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """What the worker did between two scrapes: passes, rows per pass, pass time, loop waits."""
    d = {name: after[name] - before[name] for name in after if name != "edm_worker_busy"}
    passes = d["edm_passes_total"]
    return {
        "wall_s": wall_s,
        "passes": passes,
        "passes_per_s": passes / wall_s if wall_s > 0 else float("nan"),
        "rows_per_pass": d["edm_pass_rows_sum"] / passes if passes else float("nan"),
        "padded_rows_per_pass": d["edm_pass_padded_rows_total"] / passes if passes else float("nan"),
        "ms_per_pass": 1000 * d["edm_pass_seconds_sum"] / passes if passes else float("nan"),
        "pass_busy_fraction": d["edm_pass_seconds_sum"] / wall_s if wall_s > 0 else float("nan"),
        "loop_wait_s": d["edm_pass_loop_wait_seconds_total"],
        "images": d["edm_images_total"],
        "nfe": d["edm_nfe_total"],
        **{name: d[name] for name in CPU_SERIES},
        "admission_wait_mean_ms": (1000 * d["edm_admission_wait_seconds_sum"] / d["edm_admission_wait_seconds_count"]
                                   if d["edm_admission_wait_seconds_count"] else float("nan")),
    }
