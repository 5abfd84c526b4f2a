"""Reliability soak: 32 clients load a real stack while, one phase at a time, a fault strikes it.

The stack, all real processes on loopback: Redis with its append-only file in a data folder, started
as `edm-serve up` starts it (service/up.py), one gateway (`python -m service.cli gateway`) and two
workers on the bundled digits model (CPU, EDM_HEARTBEAT_TTL_S 2 s so that the reaper acts quickly).
Each phase loads it for --phase-s seconds and strikes halfway through:

  worker-kill      the worker holding the most jobs gets SIGKILL; a new one is started at once
  worker-term      that worker gets SIGTERM (it drains and exits); a new one is started
  redis-kill       Redis gets SIGKILL and, --redis-down-s later, starts again on the same port and
                   data folder (it reloads the append-only file)
  gateway-restart  the gateway gets SIGTERM and, once it has exited, starts again on the same port

Clients: closed loop, one request at a time each. Settings are mixed: 1-3 fresh random seeds, a
random class or none, num_steps 4..40, the EDM sampler, Heun or Euler, a quarter with S_churn > 0.
Half the requests are POST /v1/generate (waits for the images; JSON with base64 PNGs), half POST
/v1/jobs then GET /v1/jobs/{id} polling; half carry an Idempotency-Key. 429, 503 and connection
errors are retried with jittered exponential backoff (Retry-After honoured up to 3 s), a keyed
request always with its same key, until --give-up-s; the gateway's queue limit is low
(--max-queued-nfe) so that 429s happen.

Accounting is the clients' own: every job id the gateway gave a client (a 202, a sync answer, a
sync 500/409 naming its job) is "accepted". When a phase's load stops, the clients finish the
request in hand (a sync wait, a retry), the fault's restart completes, --settle-s pass, then every
accepted id is read back with GET /v1/jobs/{id} until it ends (at most --final-timeout-s):
succeeded (and every image fetched and decoded as a PNG of the model's size), failed (with its
error string), cancelled (no client cancels: counted apart), or lost: unknown (404), never ended,
or succeeded with an image that cannot be fetched or is not a valid PNG. Redis is then scanned
for jobs created during the phase that no client was given (orphans): from a request that carried
an Idempotency-Key that would be a duplicate; from one without, it is a job whose answer the fault
cut off (expected, and why clients send keys).

    OMP_NUM_THREADS=1 python bench/soak.py --json bench/results/soak.json    # 2 to 3 minutes
    OMP_NUM_THREADS=1 python bench/soak.py --phase-s 6 --phases redis-kill   # one short phase

tests/reliability/test_soak.py runs a shorter version of every phase in `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from contract.ledger import Keys  # noqa: E402
from service.up import free_port, start_redis  # noqa: E402

FAULTS = {
    "worker-kill": "SIGKILL of the worker holding the most jobs; a new one started",
    "worker-term": "SIGTERM of a worker (drains, exits); a new one started",
    "redis-kill": "SIGKILL of Redis; restarted on the same port and append-only file",
    "gateway-restart": "SIGTERM of the gateway; started again on the same port",
}
TERMINAL = ("succeeded", "failed", "cancelled")
CHURN = {"S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}


@dataclass(frozen=True)
class Options:
    clients: int = 32
    phase_s: float = 20.0
    settle_s: float = 3.0
    final_timeout_s: float = 180.0
    give_up_s: float = 60.0
    heartbeat_ttl_s: float = 2.0
    redis_down_s: float = 1.0
    max_queued_nfe: int = 600
    seed: int = 0
    phases: tuple[str, ...] = tuple(FAULTS)


# -- the stack ---------------------------------------------------------------------------------------


class Stack:
    """Durable Redis, one gateway and two workers (slots 0 and 1), with the four faults. Logs go to
    `workdir` (one file per process start); Redis keeps its data in workdir/redis."""

    WORKERS = 2

    def __init__(self, workdir: Path, options: Options):
        self.workdir, self.options = workdir, options
        self.data = workdir / "redis"
        self.data.mkdir(parents=True, exist_ok=True)
        self.redis_port, self.port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * self.WORKERS
        self.starts: Counter[str] = Counter()
        self.probe = httpx.Client(base_url=self.url, timeout=2)  # readiness checks, from the fault threads too
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDM_")}
        self.env.update({
            "EDM_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "EDM_HEARTBEAT_TTL_S": str(options.heartbeat_ttl_s),
            "EDM_HEARTBEAT_INTERVAL_S": str(options.heartbeat_ttl_s / 4), "EDM_METRICS_PORT": "0",
            "EDM_MAX_QUEUED_NFE": str(options.max_queued_nfe),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)})

    # processes

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        self.starts[name] += 1
        with open(self.workdir / f"{name}.{self.starts[name]}.log", "wb") as log:
            return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=self.env, cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _spawn_worker(self, slot: int) -> None:
        self.workers[slot] = self._spawn(f"worker{slot}", ["worker", "--name", f"soak-w{slot}"])

    def _spawn_gateway(self) -> None:
        self.gateway = self._spawn("gateway", ["gateway", "--port", str(self.port)])

    def _start_redis(self) -> None:
        self.redis_proc = start_redis(self.redis_port, self.data, durable=True)

    def start(self, timeout_s: float = 180.0) -> None:
        self._start_redis()
        for slot in range(self.WORKERS):
            self._spawn_worker(slot)
        self._spawn_gateway()
        self.wait(self.healthy, timeout_s, "the stack to be ready")

    def close(self) -> None:
        self.probe.close()
        for proc in [self.gateway, *self.workers, self.redis_proc]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def log_tails(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # what is up

    def conn(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port, socket_timeout=2, socket_connect_timeout=1)

    def live_workers(self) -> dict[int, str]:
        """slot -> worker id, for each slot whose current process has a heartbeat in Redis."""
        with self.conn() as conn:
            members = [m.decode() for m in conn.smembers(Keys.WORKERS)]
            live = {}
            for slot, proc in enumerate(self.workers):
                prefix = f"soak-w{slot}-{proc.pid}-" if proc is not None else None
                for member in members:
                    if prefix and member.startswith(prefix) and conn.exists(Keys.heartbeat(member)):
                        live[slot] = member
            return live

    def ready(self) -> bool:
        try:
            return self.probe.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def healthy(self) -> bool:
        try:
            return len(self.live_workers()) == self.WORKERS and self.ready()
        except redis.RedisError:
            return False

    def wait(self, condition: Callable[[], Any], timeout_s: float, what: str) -> float:
        """Seconds until `condition()` holds; RuntimeError (with the logs) if a process exits or time runs out."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if condition():
                return time.monotonic() - started
            for proc in [self.gateway, *self.workers]:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"a process exited ({proc.args!r}) while waiting for {what}\n{self.log_tails()}")
            time.sleep(0.1)
        raise RuntimeError(f"no {what} within {timeout_s:.0f} s\n{self.log_tails()}")

    def _busiest_worker(self) -> tuple[int, str, int]:
        """(slot, worker id, claimed jobs) of the live worker holding the most jobs."""
        live = self.live_workers()
        with self.conn() as conn:
            held = {slot: int(conn.llen(Keys.claimed(wid))) for slot, wid in live.items()}
        slot = max(held, key=lambda s: held[s])
        return slot, live[slot], held[slot]

    # the faults: each blocks until the stack is whole again and says what happened

    def fault(self, name: str) -> dict[str, Any]:
        return {"worker-kill": self.kill_worker, "worker-term": self.term_worker, "redis-kill": self.kill_redis,
                "gateway-restart": self.restart_gateway}[name]()

    def kill_worker(self) -> dict[str, Any]:
        slot, wid, held = self._busiest_worker()
        proc = self.workers[slot]
        assert proc is not None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._spawn_worker(slot)
        live_s = self.wait(lambda: slot in self.live_workers(), 120, "the new worker's heartbeat")
        return {"worker": wid, "jobs_held": held, "new_worker_live_s": round(live_s, 2)}

    def term_worker(self) -> dict[str, Any]:
        slot, wid, held = self._busiest_worker()
        proc = self.workers[slot]
        assert proc is not None
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
        drain_s = time.monotonic() - started
        self._spawn_worker(slot)
        live_s = self.wait(lambda: slot in self.live_workers(), 120, "the new worker's heartbeat")
        return {"worker": wid, "jobs_held": held, "exit_code": code, "drain_s": round(drain_s, 2),
                "new_worker_live_s": round(live_s, 2)}

    def kill_redis(self) -> dict[str, Any]:
        assert self.redis_proc is not None
        with self.conn() as conn:
            keys = int(conn.dbsize())
        os.killpg(self.redis_proc.pid, signal.SIGKILL)
        self.redis_proc.wait()
        killed = time.monotonic()
        time.sleep(self.options.redis_down_s)
        self._start_redis()  # the same port and folder: it loads the append-only file before answering
        back_s = time.monotonic() - killed
        with self.conn() as conn:
            keys_after = int(conn.dbsize())
        whole_s = self.wait(self.healthy, 60, "gateway and workers to be ready after the Redis restart")
        return {"keys_before": keys, "keys_after_reload": keys_after, "redis_back_s": round(back_s, 2),
                "ready_again_s": round(back_s + whole_s, 2)}

    def restart_gateway(self) -> dict[str, Any]:
        assert self.gateway is not None
        started = time.monotonic()
        self.gateway.send_signal(signal.SIGTERM)
        code = self.gateway.wait(60)
        stopped_s = time.monotonic() - started
        self._spawn_gateway()
        ready_s = self.wait(self.ready, 60, "the new gateway's readiness")
        return {"exit_code": code, "stop_s": round(stopped_s, 2), "ready_again_s": round(stopped_s + ready_s, 2)}


# -- the clients -------------------------------------------------------------------------------------


@dataclass
class Accepted:
    mode: str          # "sync" or "async"
    keyed: bool
    at_s: float        # since the phase started
    seeds: tuple[int, ...]


@dataclass
class Tally:
    """One phase, as its clients saw it."""

    started: float = field(default_factory=time.monotonic)
    accepted: dict[str, Accepted] = field(default_factory=dict)
    requests: dict[tuple[int, ...], bool] = field(default_factory=dict)  # seeds -> carried a key
    answers: Counter[str] = field(default_factory=Counter)   # status codes and connection errors: posts and polls
    retries: int = 0
    gave_up: int = 0          # requests that never got a job id
    unexpected: list[str] = field(default_factory=list)  # answers neither retried nor naming a job
    bad_sync_pngs: int = 0

    def now(self) -> float:
        return time.monotonic() - self.started


@dataclass
class Load:
    """What a phase's clients share."""

    url: str
    options: Options
    tally: Tally
    seeds_used: set[int]
    resolution: int
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # one TLS context for all (the URLs are http): httpx builds one per client otherwise, ~0.1 s of CPU each
    tls: ssl.SSLContext = field(default_factory=ssl.create_default_context)


class Client:
    """One closed-loop client: a request, its retries and (async) its polling, then the next."""

    def __init__(self, load: Load, rng: random.Random):
        self.load, self.tally, self.rng, self.stop = load, load.tally, rng, load.stop

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.load.url, timeout=httpx.Timeout(90, connect=2),
                                     verify=self.load.tls) as http:
            while not self.stop.is_set():
                body = self.body()
                key = f"soak-{uuid.uuid4().hex}" if self.rng.random() < 0.5 else None
                seeds = tuple(body["seeds"])
                self.tally.requests[seeds] = key is not None
                if self.rng.random() < 0.5:
                    await self.sync(http, body, key, seeds)
                else:
                    await self.async_job(http, body, key, seeds)

    def body(self) -> dict[str, Any]:
        rng = self.rng
        seeds: list[int] = []
        while len(seeds) < rng.randint(1, 3):
            seed = rng.randrange(2**31)
            if seed not in self.load.seeds_used:  # fresh seeds name the request behind any job (orphans)
                self.load.seeds_used.add(seed)
                seeds.append(seed)
        body: dict[str, Any] = {"seeds": seeds, "num_steps": rng.randint(4, 40)}
        if rng.random() < 0.8:
            body["class_label"] = rng.randrange(10)
        solver = rng.choice([None, "heun", "euler"])
        if solver is not None:
            body["solver"] = solver
        if rng.random() < 0.25:
            body.update(S_churn=round(rng.uniform(1, 40), 2), **CHURN)
        return body

    async def post(self, http: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str]
                   ) -> httpx.Response | None:
        """POST until an answer other than 429, 503 or a connection error; None: gave up (--give-up-s)."""
        deadline = time.monotonic() + self.load.options.give_up_s
        for attempt in range(1000):
            wait = min(2.0, 0.1 * 2**attempt) * (0.5 + self.rng.random())
            try:
                response = await http.post(path, json=body, headers=headers)
            except httpx.TransportError as error:
                self.tally.answers[f"conn:{type(error).__name__}"] += 1
            else:
                self.tally.answers[str(response.status_code)] += 1
                if response.status_code not in (429, 503):
                    return response
                after = response.headers.get("retry-after")
                if after is not None and after.isdigit():
                    wait = min(3.0, float(after))
            if time.monotonic() + wait > deadline:
                break
            self.tally.retries += 1
            await asyncio.sleep(wait)
        self.tally.gave_up += 1
        return None

    def accept(self, job_id: str, mode: str, key: str | None, seeds: tuple[int, ...]) -> None:
        self.tally.accepted[job_id] = Accepted(mode, key is not None, round(self.tally.now(), 3), seeds)

    async def sync(self, http: httpx.AsyncClient, body: dict[str, Any], key: str | None,
                   seeds: tuple[int, ...]) -> None:
        headers = {"Accept": "application/json", **({"Idempotency-Key": key} if key else {})}
        response = await self.post(http, "/v1/generate", body, headers)
        if response is None:
            return
        answer = _json(response)
        job_id = answer.get("job_id") if response.status_code in (200, 409, 500) else answer.get("id")
        if not isinstance(job_id, str) or response.status_code not in (200, 202, 409, 500):
            self.tally.unexpected.append(f"POST /v1/generate {response.status_code}: {response.text[:200]}")
            return
        self.accept(job_id, "sync", key, seeds)
        if response.status_code == 200:
            pngs = [base64.b64decode(image["png_base64"]) for image in answer["images"]]
            self.tally.bad_sync_pngs += sum(png_problem(data, self.load.resolution) is not None for data in pngs)
        elif response.status_code == 202:  # not done within the gateway's sync timeout: poll it
            await self.poll(http, job_id)

    async def async_job(self, http: httpx.AsyncClient, body: dict[str, Any], key: str | None,
                        seeds: tuple[int, ...]) -> None:
        response = await self.post(http, "/v1/jobs", body, {"Idempotency-Key": key} if key else {})
        if response is None:
            return
        job_id = _json(response).get("id")
        if response.status_code != 202 or not isinstance(job_id, str):
            self.tally.unexpected.append(f"POST /v1/jobs {response.status_code}: {response.text[:200]}")
            return
        self.accept(job_id, "async", key, seeds)
        await self.poll(http, job_id)

    async def poll(self, http: httpx.AsyncClient, job_id: str) -> None:
        """GET the job until it ends or the load stops (the final check reads every job anyway)."""
        while not self.stop.is_set():
            await asyncio.sleep(0.3 + 0.2 * self.rng.random())
            try:
                response = await http.get(f"/v1/jobs/{job_id}")
            except httpx.TransportError as error:
                self.tally.answers[f"conn:{type(error).__name__}"] += 1
                continue
            self.tally.answers[str(response.status_code)] += 1
            if response.status_code == 200 and _json(response).get("status") in TERMINAL:
                return


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def png_problem(data: bytes, resolution: int) -> str | None:
    """None if `data` is a PNG of resolution x resolution that decodes; else what is wrong."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "not a PNG"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = image.size
    except Exception as error:  # noqa: BLE001 - any decoder error means a broken image
        return f"does not decode: {error}"
    return None if size == (resolution, resolution) else f"size {size}, expected {resolution}x{resolution}"


# -- a phase -----------------------------------------------------------------------------------------


async def final_state(http: httpx.AsyncClient, job_id: str, deadline: float, resolution: int) -> dict[str, Any]:
    """The job's end as GET /v1/jobs/{id} gives it, retried through connection errors and 5xx until
    `deadline`; a succeeded job's every image fetched and decoded."""
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            response = await http.get(f"/v1/jobs/{job_id}")
        except httpx.TransportError:
            await asyncio.sleep(0.5)
            continue
        if response.status_code == 404:
            return {"outcome": "lost", "why": "unknown (404)"}
        if response.status_code == 200:
            view = _json(response)
            if view.get("status") in TERMINAL:
                break
        await asyncio.sleep(0.5)
    else:
        return {"outcome": "lost", "why": f"not ended (status {view.get('status')}) within the final timeout"}
    out = {"outcome": view["status"], "reruns": view.get("reruns", 0), "error": view.get("error")}
    if view["status"] == "succeeded":
        for image in view.get("images", []):
            try:
                response = await http.get(image["url"])
            except httpx.TransportError as error:
                return {**out, "outcome": "lost", "why": f"image {image['index']}: {type(error).__name__}"}
            problem = (png_problem(response.content, resolution) if response.status_code == 200
                       else f"HTTP {response.status_code}")
            if problem is not None:
                return {**out, "outcome": "lost", "why": f"image {image['index']}: {problem}"}
        if len(view.get("images", [])) != len(view.get("seeds", [])):
            return {**out, "outcome": "lost", "why": "succeeded with fewer images than seeds"}
    return out


def orphans(stack: Stack, tally: Tally, known: set[str], since: float) -> dict[str, int]:
    """Jobs created since `since` (wall clock) that no client was given, by the request that made them
    (found by its fresh seeds): keyed or not, and whether that request got another job (a duplicate)
    or no job id at all (its answer was cut off)."""
    with stack.conn() as conn:
        ids = [k.decode().split(":", 2)[2] for k in conn.scan_iter(match=Keys.job("*"), count=1000)]
        created = {i: conn.hget(Keys.job(i), "created") for i in ids if i not in known}
    answered = {a.seeds for a in tally.accepted.values()}
    found: Counter[str] = Counter()
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        for job_id, at in created.items():
            if at is None or float(at) < since:
                continue
            seeds = tuple(http.get(f"/v1/jobs/{job_id}").json().get("seeds", ()))
            if seeds not in tally.requests:
                found["unknown request"] += 1
                continue
            kind = "keyed" if tally.requests[seeds] else "unkeyed"
            found[f"{kind} {'duplicate' if seeds in answered else 'unanswered'}"] += 1
    return dict(found)


async def load(stack: Stack, options: Options, tally: Tally, rng: random.Random, seeds_used: set[int],
               resolution: int, fault: str) -> dict[str, Any]:
    """--clients clients for --phase-s seconds, `fault` at the midpoint (in a thread: the clients go on)."""
    shared = Load(stack.url, options, tally, seeds_used, resolution)
    tally.started = time.monotonic()
    tasks = [asyncio.create_task(Client(shared, random.Random(rng.random())).run()) for _ in range(options.clients)]
    await asyncio.sleep(options.phase_s / 2)
    struck = tally.now()
    striking = asyncio.create_task(asyncio.to_thread(stack.fault, fault))
    await asyncio.sleep(options.phase_s / 2)
    shared.stop.set()
    stopped = tally.now()
    done, pending = await asyncio.wait(tasks, timeout=options.give_up_s + 120)
    for task in pending:
        task.cancel()
    for task in done:
        task.result()  # a client's own bug surfaces here
    detail = await striking
    return {"fault_at_s": round(struck, 2), "load_stopped_at_s": round(stopped, 2),
            "clients_done_at_s": round(tally.now(), 2), "clients_cut": len(pending), **detail}


class Soak:
    """The stack and what lasts across phases: the clients' random source, the seeds used so far, every
    job id ever accepted, the model's image size. start(), then phase(fault) for each fault, close()."""

    def __init__(self, options: Options, workdir: Path):
        self.options = options
        self.stack = Stack(workdir, options)
        self.rng = random.Random(options.seed)
        self.seeds_used: set[int] = set()
        self.known: set[str] = set()
        self.model, self.resolution = "", 0

    def start(self) -> None:
        self.stack.start()
        models = httpx.get(self.stack.url + "/v1/models", timeout=10).json()
        card = next(m for m in models["models"] if m["name"] == models["default"])
        self.model, self.resolution = card["name"], int(card["card"]["img_resolution"])

    def close(self) -> None:
        self.stack.close()

    def phase(self, fault: str) -> dict[str, Any]:
        """Load with `fault` halfway, settle, then every accepted job's end: the phase's row."""
        options, stack = self.options, self.stack
        stack.wait(stack.healthy, 120, "the stack to be whole before the phase")
        tally, wall_start = Tally(), time.time()
        timeline = asyncio.run(load(stack, options, tally, self.rng, self.seeds_used, self.resolution, fault))
        time.sleep(options.settle_s)
        ends = dict(zip(tally.accepted, asyncio.run(self.final_states(list(tally.accepted))), strict=True))
        self.known.update(tally.accepted)
        outcomes = Counter(end["outcome"] for end in ends.values())
        fault_at = timeline["fault_at_s"]
        return {
            "phase": fault, "fault": FAULTS[fault], "timeline": timeline,
            "accepted": len(tally.accepted),
            "accepted_after_fault": sum(a.at_s >= fault_at for a in tally.accepted.values()),
            "accepted_by": dict(Counter(f"{a.mode}{'+key' if a.keyed else ''}" for a in tally.accepted.values())),
            "succeeded": outcomes["succeeded"], "failed": outcomes["failed"], "cancelled": outcomes["cancelled"],
            "lost": outcomes["lost"],
            "failed_without_reason": sum(e["outcome"] == "failed" and not e.get("error") for e in ends.values()),
            "failure_reasons": dict(Counter(str(e.get("error")) for e in ends.values() if e["outcome"] == "failed")),
            "lost_jobs": {i: e["why"] for i, e in ends.items() if e["outcome"] == "lost"},
            "reruns": sum(int(e.get("reruns") or 0) for e in ends.values()),
            "requests": len(tally.requests), "answers": dict(tally.answers), "retries": tally.retries,
            "gave_up": tally.gave_up, "unexpected": tally.unexpected[:20], "bad_sync_pngs": tally.bad_sync_pngs,
            "orphans": orphans(stack, tally, self.known, wall_start),
        }

    async def final_states(self, ids: list[str]) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.options.final_timeout_s
        limit = asyncio.Semaphore(16)

        async def one(job_id: str) -> dict[str, Any]:
            async with limit:
                return await final_state(http, job_id, deadline, self.resolution)

        async with httpx.AsyncClient(base_url=self.stack.url, timeout=10) as http:
            return await asyncio.gather(*(one(i) for i in ids))


def run_soak(options: Options, workdir: Path) -> dict[str, Any]:
    """Start the stack, run every phase in order, stop it; the results as a JSON-able dict."""
    soak = Soak(options, workdir)
    started = time.monotonic()
    try:
        soak.start()
        phases = [soak.phase(fault) for fault in options.phases]
    finally:
        soak.close()
    return {"options": asdict(options), "model": soak.model, "phases": phases,
            "total_s": round(time.monotonic() - started, 1), "logs": str(workdir),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}


# -- report ------------------------------------------------------------------------------------------


def recovery(phase: dict[str, Any]) -> str:
    t = phase["timeline"]
    if "drain_s" in t:
        return f"drained {t['drain_s']} s; new worker {t['new_worker_live_s']} s"
    if "new_worker_live_s" in t:
        return f"new worker {t['new_worker_live_s']} s"
    return f"ready again {t['ready_again_s']} s"


HEAD = ("| phase | accepted (after the fault) | succeeded | failed, with a reason | lost | answers 429 / 503 / conn. "
        "error | orphans (keyed duplicates) | reruns | recovery |\n|" + "---|" * 9)


def row(p: dict[str, Any]) -> str:
    """One phase as a row under HEAD."""
    answers = Counter(p["answers"])
    conn = sum(n for name, n in answers.items() if name.startswith("conn:"))
    failed = f"{p['failed']}" + (f" ({p['failed_without_reason']} without)" if p["failed_without_reason"] else "")
    orphans = f"{sum(p['orphans'].values())} ({p['orphans'].get('keyed duplicate', 0)})"
    return (f"| {p['phase']} | {p['accepted']} ({p['accepted_after_fault']}) | {p['succeeded']} | {failed} | "
            f"**{p['lost']}** | {answers['429']} / {answers['503']} / {conn} | {orphans} | {p['reruns']} | "
            f"{recovery(p)} |")


def notes(p: dict[str, Any]) -> list[str]:
    """What a phase's row does not show: failure reasons, lost jobs, odd answers, orphans."""
    out = [f"{p['phase']}: {n} failed: {reason}" for reason, n in p["failure_reasons"].items()]
    out += [f"{p['phase']}: LOST {job_id}: {why}" for job_id, why in p["lost_jobs"].items()]
    if p["cancelled"]:
        out.append(f"{p['phase']}: {p['cancelled']} accepted jobs ended cancelled (no client cancels)")
    out += [f"{p['phase']}: unexpected answer: {u}" for u in p["unexpected"]]
    if p["orphans"]:
        out.append(f"{p['phase']}: orphans (jobs no client was given): {p['orphans']}")
    if p["gave_up"] or p["bad_sync_pngs"]:
        out.append(f"{p['phase']}: {p['gave_up']} requests gave up without a job id, "
                   f"{p['bad_sync_pngs']} bad PNGs in sync answers")
    return out


def table(results: dict[str, Any]) -> str:
    phases = results["phases"]
    total = {k: sum(p[k] for p in phases) for k in ("accepted", "succeeded", "failed", "lost")}
    last = (f"| all | {total['accepted']} | {total['succeeded']} | {total['failed']} | **{total['lost']}** "
            "| | | | |")
    return "\n".join([HEAD, *map(row, phases), last, *(n for p in phases for n in notes(p))])


def main() -> int:
    defaults = Options()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=defaults.clients, help="concurrent closed-loop clients")
    parser.add_argument("--phase-s", type=float, default=defaults.phase_s, help="seconds of load per phase")
    parser.add_argument("--settle-s", type=float, default=defaults.settle_s, help="pause before the final check")
    parser.add_argument("--final-timeout-s", type=float, default=defaults.final_timeout_s,
                        help="how long the final check waits for accepted jobs to end")
    parser.add_argument("--give-up-s", type=float, default=defaults.give_up_s, help="a request's retries, at most")
    parser.add_argument("--heartbeat-ttl-s", type=float, default=defaults.heartbeat_ttl_s,
                        help="the workers' EDM_HEARTBEAT_TTL_S")
    parser.add_argument("--redis-down-s", type=float, default=defaults.redis_down_s,
                        help="how long Redis stays down after its SIGKILL")
    parser.add_argument("--max-queued-nfe", type=int, default=defaults.max_queued_nfe,
                        help="the gateway's EDM_MAX_QUEUED_NFE (low: some 429s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the clients' random choices")
    parser.add_argument("--phases", nargs="+", choices=list(FAULTS), default=list(FAULTS))
    parser.add_argument("--json", type=Path, help="write the results here (e.g. bench/results/soak.json)")
    args = parser.parse_args()
    options = Options(clients=args.clients, phase_s=args.phase_s, settle_s=args.settle_s,
                      final_timeout_s=args.final_timeout_s, give_up_s=args.give_up_s,
                      heartbeat_ttl_s=args.heartbeat_ttl_s, redis_down_s=args.redis_down_s,
                      max_queued_nfe=args.max_queued_nfe, seed=args.seed, phases=tuple(args.phases))
    results = run_soak(options, Path(tempfile.mkdtemp(prefix="edm-soak-")))
    results["command"] = " ".join(["python", "bench/soak.py", *sys.argv[1:]])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"(total {results['total_s']:.0f} s; logs in {results['logs']})")
    return 1 if any(p["lost"] for p in results["phases"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
