"""End-to-end service throughput and latency against the sampler called in-process.

Starts Redis, one worker (max_batch = --batch) and the gateway as real processes, then measures,
on the same model, batch size and step count:

* in-process: model.generate.generate() on --batch seeds, and on one seed;
* service, one request of --batch seeds (HTTP -> Redis -> worker -> PNGs -> HTTP, JSON answer);
* service, --batch concurrent one-image requests (request-level batching in the worker);
* service, --singles sequential one-image requests (image/png answer).

interleaved (so that load from other processes hits both alike), and prints images/s, latency
p50/p95/p99, the ratio service / in-process images/s at --batch (goal >= 0.9 at 64) and the
one-image overhead beyond sampling (goal <= 15 ms). Example:

    python bench/service.py --model model/bundled/edm-digits-8x8-cond.json --batch 64 --steps 18

Torch runs on one thread (OMP_NUM_THREADS=1) in both the worker and the in-process baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "n": len(ordered)}


class InProcess:
    """The sampler called directly, on one thread, in this process."""

    def __init__(self, model: Path, steps: int, device: str, dtype: str):
        import torch

        from model.checkpoint import load_model
        from model.generate import SamplerSettings, generate
        from worker.engine import DTYPES

        torch.set_num_threads(1)
        self.net = load_model(model, device=device).net
        if dtype != "auto":
            self.net.compute_dtype = DTYPES[dtype]
        self.settings = SamplerSettings(num_steps=steps)
        self.generate = generate
        self.run([0])  # warm-up

    def run(self, seeds: list[int]) -> float:
        started = time.perf_counter()
        self.generate(self.net, seeds, [None] * len(seeds), self.settings)
        return time.perf_counter() - started


class Stack:
    """Redis + worker + gateway as child processes (their logs go to a temporary folder)."""

    def __init__(self, model: Path, batch: int, max_wait: float, device: str, dtype: str):
        from service.up import free_port, start_redis

        self.tmp = Path(tempfile.mkdtemp(prefix="edm-bench-"))
        redis_port, self.port = free_port(), free_port()
        self.redis = start_redis(redis_port, self.tmp)
        env = {**os.environ, "EDM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "EDM_BUNDLED_MODEL": "false",
               "EDM_MODELS": json.dumps({"bench": str(model)}), "EDM_MAX_BATCH": str(batch),
               "EDM_MAX_WAIT_S": str(max_wait), "EDM_METRICS_PORT": "0", "OMP_NUM_THREADS": "1",
               "EDM_MAX_IMAGES": str(max(batch, 256)), "EDM_LOG_LEVEL": "WARNING", "EDM_DEVICE": device,
               "EDM_DTYPE": dtype}
        cli = [sys.executable, "-m", "service.cli"]
        self.procs = [subprocess.Popen([*cli, name, *extra], env=env, cwd=ROOT, stdout=log, stderr=log)
                      for name, extra, log in (
                          ("worker", [], open(self.tmp / "worker.log", "wb")),  # noqa: SIM115
                          ("gateway", ["--port", str(self.port)], open(self.tmp / "gateway.log", "wb")))]
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"service not ready; logs in {self.tmp}")

    def close(self) -> None:
        for proc in [*self.procs, self.redis]:
            proc.terminate()
            proc.wait(30)


def measure(url: str, local: InProcess, batch: int, steps: int, repeats: int, singles: int) -> dict:
    """Service and in-process runs interleaved, so that load from elsewhere hits both alike."""
    import httpx

    client = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=batch + 8))

    sampling: list[float] = []

    def post(body: dict, accept: str) -> float:
        started = time.perf_counter()
        response = client.post("/v1/generate", json={**body, "num_steps": steps}, headers={"Accept": accept})
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
        timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
        sampling.append(float(timing["sampling"]) / 1000)
        return elapsed

    post({"seeds": [0]}, "image/png")  # warm-up
    post({"count": batch, "start": 0}, "application/json")
    local_batch, one_request, concurrent_wall, concurrent_latency = [], [], [], []
    one_request_sampling: list[float] = []
    with ThreadPoolExecutor(batch) as pool:
        for k in range(repeats):
            seeds = list(range((k + 1) * batch, (k + 2) * batch))
            local_batch.append(local.run(seeds))
            one_request.append(post({"seeds": seeds}, "application/json"))
            one_request_sampling.append(sampling[-1])
            started = time.perf_counter()
            concurrent_latency += list(pool.map(lambda seed: post({"seeds": [seed]}, "image/png"), seeds))
            concurrent_wall.append(time.perf_counter() - started)
    local_single, single, beyond = [], [], []
    for k in range(singles):
        local_single.append(local.run([200_000 + k]))
        single.append(post({"seeds": [200_000 + k]}, "image/png"))
        beyond.append(single[-1] - sampling[-1])
    client.close()
    return {
        "in_process": {"batch_s": percentiles(local_batch), "images_per_s": batch / statistics.median(local_batch),
                       "single_s": percentiles(local_single)},
        "one_request": {"latency_s": percentiles(one_request), "images_per_s": batch / statistics.median(one_request),
                        "worker_sampling_s": percentiles(one_request_sampling)},
        "concurrent": {"latency_s": percentiles(concurrent_latency),
                       "images_per_s": batch / statistics.median(concurrent_wall)},
        "single": {"latency_s": percentiles(single), "beyond_sampling_s": percentiles(beyond)},
    }


def main() -> int:
    default_model = next(iter(sorted((ROOT / "model" / "bundled").glob("*.json"))), None)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model, help="our-format card (.json) [bundled]")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per measurement")
    parser.add_argument("--singles", type=int, default=30, help="timed one-image requests")
    parser.add_argument("--max-wait", type=float, default=0.05, help="the worker's EDM_MAX_WAIT_S")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (worker and in-process alike)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--url", help="measure a running gateway instead of starting one (its worker's "
                                      "max_batch should be --batch)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.model is None:
        parser.error("no bundled model found; pass --model")

    stack = None if args.url else Stack(args.model, args.batch, args.max_wait, args.device, args.dtype)
    try:
        local_sampler = InProcess(args.model, args.steps, args.device, args.dtype)
        served = measure(args.url or stack.url, local_sampler, args.batch, args.steps, args.repeats, args.singles)
    finally:
        if stack is not None:
            stack.close()
    local = served["in_process"]

    ratio = served["one_request"]["images_per_s"] / local["images_per_s"]
    ratio_concurrent = served["concurrent"]["images_per_s"] / local["images_per_s"]
    overhead_ms = (served["single"]["latency_s"]["p50"] - local["single_s"]["p50"]) * 1000
    ms = lambda d: f"p50 {d['p50'] * 1000:8.1f}  p95 {d['p95'] * 1000:8.1f}  p99 {d['p99'] * 1000:8.1f} ms"  # noqa: E731
    where = args.device if args.device.startswith("cuda") else f"CPU threads 1, {platform.processor()}"
    print(f"model {args.model.name}, batch {args.batch}, {args.steps} steps, {args.dtype}, {where}")
    print(f"in-process   batch    {local['images_per_s']:8.1f} img/s   {ms(local['batch_s'])}")
    print(f"in-process   1 image                    {ms(local['single_s'])}")
    print(f"service      1 req x {args.batch:<3} {served['one_request']['images_per_s']:8.1f} img/s   "
          f"{ms(served['one_request']['latency_s'])}")
    print(f"             (of which the worker's sampler: {ms(served['one_request']['worker_sampling_s'])})")
    print(f"service      {args.batch:>3} concurrent {served['concurrent']['images_per_s']:6.1f} img/s   "
          f"{ms(served['concurrent']['latency_s'])}")
    print(f"service      1 image                    {ms(served['single']['latency_s'])}")
    print(f"ratio service/in-process at batch {args.batch}: {ratio:.3f} (one request), "
          f"{ratio_concurrent:.3f} ({args.batch} concurrent requests)   goal >= 0.9")
    direct_ms = served["single"]["beyond_sampling_s"]["p50"] * 1000
    print(f"one-image overhead beyond sampling (p50): {overhead_ms:.1f} ms vs in-process; {direct_ms:.1f} ms "
          "= latency - the worker's sampling time (Server-Timing), per request   goal <= 15 ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "in_process": local,
                                         "service": served, "ratio": ratio, "ratio_concurrent": ratio_concurrent,
                                         "overhead_ms": overhead_ms, "overhead_direct_ms": direct_ms}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
