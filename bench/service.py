"""A/B benchmark of the worker's schedulers, end to end, against the sampler called in-process.

Two full stacks run side by side (bench/stack.py: each its own Redis, one worker, one gateway, real
processes on loopback): arm `request` (EDM_SCHEDULER=request: jobs share a batch only when their
settings match and they arrive within EDM_MAX_WAIT_S) and arm `step` (EDM_SCHEDULER=step: continuous
step-level batching over a slot table). Every workload runs on both arms in one run, the arms
alternating (and the in-process sampler interleaved) so that load from other processes hits all
alike. Workloads (issue 9, section 8):

a. concurrent: --batch concurrent one-image requests, identical settings (--steps), against
   model.generate.generate() on --batch seeds in this process; goal step >= 0.9x in-process images/s.
   Also one request of --batch seeds per arm (JSON answer), and when the last of the --batch jobs
   was submitted and started (Server-Timing), after the burst's first request was sent.
b. closed loop: --clients clients, each sending one-image requests back to back for --closed-s
   (after --warmup-s): random seed and class, num_steps uniform in 4..40, solver euler or heun, a
   quarter with churn (S_churn 40, S_min 0.05, S_max 50, S_noise 1.003). Throughput, latency p50/p99,
   count, errors; goals step >= 8x request throughput and step p99 <= 0.25x request p99.
c. open loop: Poisson arrivals of 1-4-image requests (num_steps in {8, 18, 32, 64}, the default EDM
   Heun sampler) for --open-s, then at most --open-bound-s for stragglers (those left are counted
   and cancelled). The rate is --open-load (0.8) x the step arm's capacity measured in (b), in NFE/s,
   converted with this workload's mean NFE per image (both arms get the same arrivals). Latency runs
   from each request's scheduled arrival (no coordinated omission); requests are issued by an
   asyncio loop, never waiting for answers.
d. lone request: --singles sequential one-image requests (--steps) per arm, alternating, and the
   in-process sampler on one seed; goal step p50 <= 1.1x request p50. Also the overhead beyond
   sampling (latency minus the worker's sampling time from Server-Timing).

For every workload and arm the worker's Prometheus counters are read before and after (forward
passes, images per pass, ms per pass, seconds the pass loop waited on its writer), and the CPU
seconds of each process from /proc (the worker's pass-loop thread and its other threads, the
gateway, Redis, this client), printed per image. In (d), each request's time in forward passes.
(The request scheduler's "ms per pass" is the time between two evaluations, its bookkeeping
included; the step scheduler's is the slot engine's step() alone.)

    OMP_NUM_THREADS=1 python bench/service.py --json bench/results/service-ab.json
    OMP_NUM_THREADS=1 python bench/service.py --quick          # smoke run, about 2 minutes

Torch runs on one thread (OMP_NUM_THREADS=1) in the workers and in the in-process baseline.
Everything is bounded in count and time; the stacks stop at the end (logs stay in their temp dirs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.stack import CPU_SERIES, InProcess, Stack, metrics_delta, percentiles  # noqa: E402

ARMS = ("request", "step")
CHURN = {"S_churn": 40, "S_min": 0.05, "S_max": 50, "S_noise": 1.003}
OPEN_STEPS = (8, 18, 32, 64)


def nfe_per_image(body: dict) -> int:
    steps = body.get("num_steps", 18)
    return steps if body.get("solver") == "euler" else 2 * steps - 1


def arm_order(k: int) -> tuple[str, ...]:
    """Alternate which arm goes first."""
    return ARMS if k % 2 == 0 else ARMS[::-1]


@dataclass
class Outcome:
    """One request as the client saw it."""

    issued: float        # perf_counter when it was (scheduled to be) sent
    done: float          # perf_counter when its answer arrived (or it failed)
    images: int
    nfe: int             # network evaluations per image x images
    status: int          # HTTP status; 0 = transport error or unanswered
    sampling_s: float | None = None  # the worker's sampling time (Server-Timing)
    queue_s: float | None = None     # submission -> first step (Server-Timing)
    job_s: float | None = None       # submission -> done (Server-Timing)

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def latency(self) -> float:
        return self.done - self.issued


def server_timing(response: httpx.Response) -> dict[str, float]:
    """The Server-Timing header in seconds: queue (submitted -> first step), sampling, job."""
    parts = (part.strip().split(";dur=", 1) for part in response.headers.get("server-timing", "").split(","))
    return {name: float(ms) / 1000 for name, ms in (p for p in parts if len(p) == 2)}


def accept_for(body: dict) -> str:
    return "image/png" if len(body.get("seeds", [])) == 1 else "application/json"


class Arm:
    """One stack and a thread-safe blocking client for it."""

    def __init__(self, stack: Stack, connections: int):
        self.stack, self.name = stack, stack.scheduler
        self.client = httpx.Client(base_url=stack.url, timeout=900,
                                   limits=httpx.Limits(max_connections=connections,
                                                       max_keepalive_connections=connections))

    def post(self, body: dict, issued: float | None = None) -> Outcome:
        issued = time.perf_counter() if issued is None else issued
        images = len(body["seeds"])
        try:
            response = self.client.post("/v1/generate", json=body, headers={"Accept": accept_for(body)})
            status, timing = response.status_code, server_timing(response)
        except httpx.HTTPError:
            status, timing = 0, {}
        return Outcome(issued, time.perf_counter(), images, images * nfe_per_image(body), status,
                       timing.get("sampling"), timing.get("queue"), timing.get("job"))

    def checked(self, body: dict) -> Outcome:
        outcome = self.post(body)
        if not outcome.ok:
            raise RuntimeError(f"{self.name}: HTTP {outcome.status} for {body}; logs in {self.stack.tmp}")
        return outcome

    def workload(self, fn, *args) -> tuple[Any, dict]:  # noqa: ANN001
        """Run fn(*args) and return (its result, what the worker did meanwhile, and CPU seconds)."""
        before = {**self.stack.metrics(), "cpu_bench_client_s": time.process_time()}
        started = time.perf_counter()
        result = fn(*args)
        after = {**self.stack.metrics(), "cpu_bench_client_s": time.process_time()}
        return result, metrics_delta(before, after, time.perf_counter() - started)


# a. concurrent identical one-image requests -----------------------------------------------------

def concurrent(arms: dict[str, Arm], local: InProcess, batch: int, steps: int, repeats: int) -> dict:
    rows: dict[str, dict[str, list[float]]] = {name: {"one_request_s": [], "one_request_sampling_s": [],
                                                      "concurrent_wall_s": [], "concurrent_latency_s": [],
                                                      "last_submitted_s": [], "last_started_s": []}
                                               for name in arms}
    local_batch: list[float] = []
    workers: dict[str, list[dict]] = {name: [] for name in arms}
    seed = 1000
    with ThreadPoolExecutor(batch) as pool:
        for k in range(repeats):
            local_batch.append(local.run(list(range(seed, seed + batch))))
            for name in arm_order(k):
                arm, r = arms[name], rows[name]
                seeds = list(range(seed, seed + batch))
                one, one_worker = arm.workload(arm.checked, {"seeds": seeds, "num_steps": steps})
                r["one_request_s"].append(one.latency)
                r["one_request_sampling_s"].append(one.sampling_s or math.nan)

                def burst(arm: Arm = arm, seeds: list[int] = seeds) -> tuple[float, float, list[Outcome]]:
                    started = time.perf_counter()
                    outs = list(pool.map(lambda s: arm.checked({"seeds": [s], "num_steps": steps}), seeds))
                    return started, time.perf_counter() - started, outs

                (began, wall, outs), delta = arm.workload(burst)
                # When the last job was submitted, and when its first step ran, after the burst began
                # (from Server-Timing: the answer's arrival less the job's total, less its sampling).
                r["last_submitted_s"].append(max(o.done - (o.job_s or math.nan) for o in outs) - began)
                r["last_started_s"].append(max(o.done - (o.sampling_s or math.nan) for o in outs) - began)
                r["concurrent_wall_s"].append(wall)
                r["concurrent_latency_s"] += [o.latency for o in outs]
                workers[name].append({"concurrent": delta, "one_request": one_worker})
            seed += batch
    local_ips = batch / statistics.median(local_batch)
    out: dict[str, Any] = {"in_process": {"batch_s": percentiles(local_batch), "images_per_s": local_ips}}
    for name, r in rows.items():
        ips = batch / statistics.median(r["concurrent_wall_s"])
        one_ips = batch / statistics.median(r["one_request_s"])
        out[name] = {
            "concurrent": {"images_per_s": ips, "ratio_in_process": ips / local_ips,
                           "wall_s": percentiles(r["concurrent_wall_s"]),
                           "latency_s": percentiles(r["concurrent_latency_s"]),
                           "last_submitted_s": percentiles(r["last_submitted_s"]),
                           "last_started_s": percentiles(r["last_started_s"])},
            "one_request": {"images_per_s": one_ips, "ratio_in_process": one_ips / local_ips,
                            "latency_s": percentiles(r["one_request_s"]),
                            "worker_sampling_s": percentiles(r["one_request_sampling_s"])},
            "worker": workers[name][-1]["concurrent"],  # the last repeat's
            "worker_one_request": workers[name][-1]["one_request"],
        }
    return out


# b. closed loop ---------------------------------------------------------------------------------

def mixed_body(rng: random.Random) -> dict:
    body = {"seeds": [rng.randrange(2**31)], "class_label": rng.randrange(10), "num_steps": rng.randint(4, 40),
            "solver": rng.choice(("euler", "heun"))}
    if rng.random() < 0.25:
        body.update(CHURN)
    return body


def closed_loop(arm: Arm, clients: int, warmup_s: float, duration_s: float, seed: int) -> dict:
    """`clients` threads send requests back to back; measured: requests issued in the window
    [warmup, warmup + duration] (their latencies, including those answered after it) and images
    answered inside the window (throughput)."""
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + duration_s)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        while time.perf_counter() < window[1]:
            outcome = arm.post(mixed_body(rng))
            with lock:
                outcomes.append(outcome)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    drained = time.perf_counter() - window[1]
    issued = [o for o in outcomes if o.issued >= window[0]]
    ok = [o for o in issued if o.ok]
    in_window = [o for o in outcomes if o.ok and window[0] <= o.done <= window[1]]
    return {
        "requests": len(ok), "errors": len(issued) - len(ok),
        "images_per_s": sum(o.images for o in in_window) / duration_s,
        "nfe_per_s": sum(o.nfe for o in in_window) / duration_s,
        "latency_s": percentiles([o.latency for o in ok]),
        "queue_s": percentiles([o.queue_s for o in ok if o.queue_s is not None]),
        "beyond_sampling_s": percentiles([o.latency - o.sampling_s for o in ok if o.sampling_s is not None]),
        "drain_s": drained,
    }


# c. open loop -----------------------------------------------------------------------------------

def open_schedule(rate_per_s: float, duration_s: float, seed: int) -> list[tuple[float, dict]]:
    """Poisson arrivals (offset from the start, request body), the same for both arms."""
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= duration_s:
            return out
        count = rng.randint(1, 4)
        out.append((t, {"seeds": [rng.randrange(2**31) for _ in range(count)], "class_label": rng.randrange(10),
                        "num_steps": rng.choice(OPEN_STEPS)}))


async def _open_loop(arm: Arm, schedule: list[tuple[float, dict]], bound_s: float, connections: int) -> dict:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=arm.stack.url, timeout=900, limits=limits) as client:
        outcomes: list[Outcome] = []
        lateness: list[float] = []
        keys: dict[asyncio.Task, tuple[str, dict]] = {}

        async def one(issued: float, body: dict, key: str) -> None:
            images = len(body["seeds"])
            try:
                response = await client.post("/v1/generate", json=body,
                                             headers={"Accept": accept_for(body), "Idempotency-Key": key})
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            outcomes.append(Outcome(issued, time.perf_counter(), images, images * nfe_per_image(body), status))

        start = time.perf_counter()
        for offset, body in schedule:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lateness.append(time.perf_counter() - start - offset)
            key = uuid.uuid4().hex
            keys[asyncio.create_task(one(start + offset, body, key))] = (key, body)
        issuing_end = time.perf_counter()
        pending: set[asyncio.Task] = set(keys)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=bound_s)
        waited = time.perf_counter() - issuing_end
        for task in pending:
            task.cancel()
        # cancel the unfinished jobs too, so that they do not load the machine afterwards: the same
        # Idempotency-Key on POST /v1/jobs returns the job the sync request created
        cancelled = 0
        for task in pending:
            key, body = keys[task]
            try:
                response = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}, timeout=10)
                if response.status_code == 202:
                    await client.post(response.headers["location"] + "/cancel", timeout=10)
                    cancelled += 1
            except httpx.HTTPError:
                pass
    ok = [o for o in outcomes if o.ok]
    last = max((o.done for o in ok), default=start)
    return {
        "offered": len(schedule), "offered_images": sum(len(b["seeds"]) for _, b in schedule),
        "completed": len(ok), "errors": len(outcomes) - len(ok), "unfinished_at_bound": len(pending),
        "cancelled_after_bound": cancelled,
        "images_per_s": sum(o.images for o in ok) / (last - start) if ok else 0.0,
        "latency_s": percentiles([o.latency for o in ok]),
        "waited_after_issuing_s": waited,
        "issue_lateness_max_ms": 1000 * max(lateness, default=0.0),
    }


def open_loop(arm: Arm, schedule: list[tuple[float, dict]], bound_s: float, connections: int) -> dict:
    result = asyncio.run(_open_loop(arm, schedule, bound_s, connections))
    result["idle_after"] = arm.stack.wait_idle(60)  # the cancelled rest leaves the worker
    return result


# d. lone requests -------------------------------------------------------------------------------

def lone(arms: dict[str, Arm], local: InProcess, steps: int, singles: int) -> dict:
    local_single: list[float] = []
    latency: dict[str, list[float]] = {name: [] for name in arms}
    beyond: dict[str, list[float]] = {name: [] for name in arms}
    in_passes: dict[str, list[float]] = {name: [] for name in arms}  # the worker's time in forward passes
    for k in range(singles):
        seed = 500_000 + k
        local_single.append(local.run([seed]))
        for name in arm_order(k):
            arm = arms[name]
            outcome, worker = arm.workload(arm.checked, {"seeds": [seed], "num_steps": steps})
            latency[name].append(outcome.latency)
            beyond[name].append(outcome.latency - (outcome.sampling_s or math.nan))
            in_passes[name].append(worker["passes"] * worker["ms_per_pass"] / 1000)
    out: dict[str, Any] = {"in_process": {"latency_s": percentiles(local_single)}}
    for name in arms:
        out[name] = {"latency_s": percentiles(latency[name]), "beyond_sampling_s": percentiles(beyond[name]),
                     "in_passes_s": percentiles(in_passes[name])}
    return out


# the run ----------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    stacks = {name: Stack(args.model, name, max_pass_rows=args.max_pass_rows, max_wait=args.max_wait,
                          device=args.device, dtype=args.dtype, max_images=max(args.batch, 256)) for name in ARMS}
    results: dict[str, Any] = {"logs": {name: str(stack.tmp) for name, stack in stacks.items()}}
    try:
        for stack in stacks.values():
            stack.start()
        local = InProcess(args.model, args.steps, args.device, args.dtype)
        for stack in stacks.values():
            stack.wait_ready()
        connections = max(args.batch, args.clients) + 16
        arms = {name: Arm(stack, connections) for name, stack in stacks.items()}
        for arm in arms.values():  # warm-up: one image, one batch
            arm.checked({"seeds": [0], "num_steps": args.steps})
            arm.checked({"seeds": list(range(args.batch)), "num_steps": args.steps})

        log("a. concurrent")
        results["concurrent"] = concurrent(arms, local, args.batch, args.steps, args.repeats)

        log("b. closed loop")
        closed: dict[str, Any] = {}
        for name in arm_order(1):
            log(f"   {name} arm, {args.clients} clients, {args.warmup_s:g} + {args.closed_s:g} s")
            result, worker = arms[name].workload(closed_loop, arms[name], args.clients, args.warmup_s,
                                                 args.closed_s, args.seed)
            closed[name] = {**result, "worker": worker}
        results["closed_loop"] = closed

        mean_nfe = statistics.mean(2 * steps - 1 for steps in OPEN_STEPS) * 2.5  # Heun; 1-4 images
        capacity_nfe = closed["step"]["nfe_per_s"]
        rate = args.open_load * capacity_nfe / mean_nfe
        schedule = open_schedule(rate, args.open_s, args.seed)
        log(f"c. open loop: {rate:.2f} requests/s = {args.open_load:g} x the step arm's {capacity_nfe:.0f} NFE/s "
            f"from (b) / {mean_nfe:.1f} NFE per request; {len(schedule)} requests")
        opened: dict[str, Any] = {"rate_per_s": rate, "load": args.open_load, "capacity_nfe_per_s": capacity_nfe,
                                  "mean_nfe_per_request": mean_nfe,
                                  "offered_images_per_s": rate * 2.5}
        for name in arm_order(0):
            log(f"   {name} arm, {args.open_s:g} s + at most {args.open_bound_s:g} s")
            result, worker = arms[name].workload(open_loop, arms[name], schedule, args.open_bound_s,
                                                 max(1024, len(schedule) + 16))
            opened[name] = {**result, "worker": worker}
        results["open_loop"] = opened

        log("d. lone requests")
        results["lone"] = lone(arms, local, args.steps, args.singles)
        for arm in arms.values():
            arm.client.close()
    finally:
        for stack in stacks.values():
            stack.close()
    return results


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def goals(r: dict) -> list[tuple[str, float, str, bool]]:
    """(what, value, goal, met) for the goals of issue 9, section 8."""
    conc, closed, lone_ = r["concurrent"], r["closed_loop"], r["lone"]
    values = [
        ("a. step concurrent / in-process images/s", conc["step"]["concurrent"]["ratio_in_process"], ">= 0.9"),
        ("b. step / request throughput", closed["step"]["images_per_s"] / closed["request"]["images_per_s"], ">= 8"),
        ("b. step / request p99 latency", closed["step"]["latency_s"]["p99"] / closed["request"]["latency_s"]["p99"],
         "<= 0.25"),
        ("d. step / request lone p50", lone_["step"]["latency_s"]["p50"] / lone_["request"]["latency_s"]["p50"],
         "<= 1.1"),
    ]
    return [(what, v, goal, v >= float(goal[3:]) if goal.startswith(">=") else v <= float(goal[3:]))
            for what, v, goal in values]


def table(r: dict, args: argparse.Namespace) -> str:
    ms = lambda s: f"{s * 1000:.0f}"  # noqa: E731
    lines = []
    add = lines.append

    def row(label: str, request: str, step: str, ratio: str = "") -> None:
        add(f"{label:<44} {request:>18} {step:>18} {ratio:>10}")

    def tail(d: dict) -> str:
        return f"{ms(d['latency_s']['p50'])} / {ms(d['latency_s']['p99'])}"

    def intake(d: dict) -> str:
        return f"{d['last_submitted_s']['p50']:.2f} / {d['last_started_s']['p50']:.2f}"

    def vs_local(d: dict) -> str:
        return f"{d['images_per_s']:.1f} ({d['ratio_in_process']:.2f}x)"

    def work(w: dict) -> str:
        return f"{w['rows_per_pass']:.1f} rows/{w['ms_per_pass']:.1f} ms"

    def cpu(label: str, wr: dict, ws: dict) -> None:
        """CPU ms per image: worker pass-loop thread + its other threads, gateway, Redis, bench client."""
        def one(w: dict) -> str:
            per = 1000 / max(w["images"], 1)
            return "/".join(f"{w[k] * per:.0f}" for k in CPU_SERIES)
        row(f"   {label}", one(wr), one(ws))

    where = args.device if args.device.startswith("cuda") else f"CPU, torch 1 thread, {os.cpu_count()} cores"
    add(f"model {args.model.name}, {where}, {platform.python_implementation()} {platform.python_version()}, "
        f"EDM_MAX_PASS_ROWS {args.max_pass_rows}, request arm EDM_MAX_WAIT_S {args.max_wait:g}")
    row("", "request", "step", "step/req")
    c = r["concurrent"]
    inp = c["in_process"]["images_per_s"]
    add(f"a. {args.batch} concurrent 1-image requests, {args.steps} steps; in-process {inp:.1f} img/s "
        f"(p50 {ms(c['in_process']['batch_s']['p50'])} ms per {args.batch})")
    cr, cs = c["request"], c["step"]
    row("   images/s (x in-process)", vs_local(cr["concurrent"]), vs_local(cs["concurrent"]),
        f"{cs['concurrent']['images_per_s'] / cr['concurrent']['images_per_s']:.2f}")
    row("   latency p50 / p99 ms", tail(cr["concurrent"]), tail(cs["concurrent"]))
    row("   worker: images per pass / ms per pass", work(cr["worker"]), work(cs["worker"]))
    row("   last job submitted / started at (s)", intake(cr["concurrent"]), intake(cs["concurrent"]))
    cpu("CPU ms/image: loop/thr/gw/redis/client", cr["worker"], cs["worker"])
    row(f"   one request of {args.batch}: images/s (x in-process)", vs_local(cr["one_request"]),
        vs_local(cs["one_request"]))
    row("   ... images per pass / ms per pass", work(cr["worker_one_request"]), work(cs["worker_one_request"]))
    cpu("... CPU ms/image: loop/thr/gw/redis/client", cr["worker_one_request"], cs["worker_one_request"])
    b = r["closed_loop"]
    br, bs = b["request"], b["step"]
    add(f"b. closed loop, {args.clients} clients, {args.closed_s:g} s (after {args.warmup_s:g} s warm-up), "
        "steps 4-40, euler/heun, 1/4 churn")
    row("   images/s", f"{br['images_per_s']:.2f}", f"{bs['images_per_s']:.2f}",
        f"{bs['images_per_s'] / br['images_per_s']:.2f}")
    row("   latency p50 ms", ms(br["latency_s"]["p50"]), ms(bs["latency_s"]["p50"]),
        f"{bs['latency_s']['p50'] / br['latency_s']['p50']:.3f}")
    row("   latency p99 ms", ms(br["latency_s"]["p99"]), ms(bs["latency_s"]["p99"]),
        f"{bs['latency_s']['p99'] / br['latency_s']['p99']:.3f}")
    row("   requests ok / errors", f"{br['requests']} / {br['errors']}", f"{bs['requests']} / {bs['errors']}")
    row("   queue wait p50 / p99 ms (Server-Timing)", f"{ms(br['queue_s']['p50'])} / {ms(br['queue_s']['p99'])}",
        f"{ms(bs['queue_s']['p50'])} / {ms(bs['queue_s']['p99'])}")
    row("   latency - sampling p50 / p99 ms", f"{ms(br['beyond_sampling_s']['p50'])} / "
        f"{ms(br['beyond_sampling_s']['p99'])}", f"{ms(bs['beyond_sampling_s']['p50'])} / "
        f"{ms(bs['beyond_sampling_s']['p99'])}")
    row("   worker: images per pass / ms per pass", work(br["worker"]), work(bs["worker"]))
    row("   worker: pass loop waited on writer (s)", f"{br['worker']['loop_wait_s']:.2f}",
        f"{bs['worker']['loop_wait_s']:.2f}")
    row("   worker: time in passes (fraction of wall)", f"{br['worker']['pass_busy_fraction']:.2f}",
        f"{bs['worker']['pass_busy_fraction']:.2f}")
    cpu("CPU ms/image: loop/thr/gw/redis/client", br["worker"], bs["worker"])
    o = r["open_loop"]
    orq, ost = o["request"], o["step"]
    add(f"c. open loop, Poisson {o['rate_per_s']:.2f} req/s ({o['offered_images_per_s']:.1f} img/s offered = "
        f"{o['load']:g} x step capacity from b in NFE/s), 1-4 images, steps {{8,18,32,64}}, Heun, "
        f"{args.open_s:g} s + <= {args.open_bound_s:g} s")
    row("   images/s", f"{orq['images_per_s']:.2f}", f"{ost['images_per_s']:.2f}",
        f"{ost['images_per_s'] / orq['images_per_s']:.2f}" if orq["images_per_s"] else "-")
    row("   latency p50 / p99 ms", tail(orq), tail(ost))
    row("   requests offered / done / unfinished", f"{orq['offered']} / {orq['completed']} / "
        f"{orq['unfinished_at_bound']}", f"{ost['offered']} / {ost['completed']} / {ost['unfinished_at_bound']}")
    row("   errors; max issue lateness ms", f"{orq['errors']}; {orq['issue_lateness_max_ms']:.0f}",
        f"{ost['errors']}; {ost['issue_lateness_max_ms']:.0f}")
    row("   worker: images per pass / ms per pass", work(orq["worker"]), work(ost["worker"]))
    cpu("CPU ms/image: loop/thr/gw/redis/client", orq["worker"], ost["worker"])
    d = r["lone"]
    add(f"d. lone 1-image request, {args.steps} steps, {args.singles}x sequential; in-process p50 "
        f"{ms(d['in_process']['latency_s']['p50'])} ms")
    row("   latency p50 / p99 ms", tail(d["request"]), tail(d["step"]),
        f"{d['step']['latency_s']['p50'] / d['request']['latency_s']['p50']:.3f}")
    row("   beyond the worker's sampling, p50 ms", f"{d['request']['beyond_sampling_s']['p50'] * 1000:.1f}",
        f"{d['step']['beyond_sampling_s']['p50'] * 1000:.1f}")
    row("   worker: in forward passes, p50 ms", ms(d["request"]["in_passes_s"]["p50"]),
        ms(d["step"]["in_passes_s"]["p50"]))
    add("goals (issue 9, section 8):")
    for what, value, goal, met in goals(r):
        add(f"   {what:<44} {value:8.3f}   goal {goal:<8} {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def main() -> int:
    default_model = next(iter(sorted((ROOT / "model" / "bundled").glob("*.json"))), None)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model, help="our-format card (.json) [bundled]")
    parser.add_argument("--batch", type=int, default=64, help="a: concurrent requests and in-process batch")
    parser.add_argument("--steps", type=int, default=18, help="a, d: num_steps")
    parser.add_argument("--repeats", type=int, default=5, help="a: timed bursts per arm")
    parser.add_argument("--clients", type=int, default=32, help="b: closed-loop clients")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="b: not measured, per arm")
    parser.add_argument("--closed-s", type=float, default=60.0, help="b: measured seconds per arm")
    parser.add_argument("--open-s", type=float, default=45.0, help="c: seconds of arrivals per arm")
    parser.add_argument("--open-bound-s", type=float, default=30.0, help="c: longest wait for stragglers")
    parser.add_argument("--open-load", type=float, default=0.8, help="c: offered load / step capacity from b")
    parser.add_argument("--singles", type=int, default=20, help="d: sequential requests per arm")
    parser.add_argument("--max-pass-rows", type=int, default=64, help="both workers' EDM_MAX_PASS_ROWS")
    parser.add_argument("--max-wait", type=float, default=0.05, help="request arm's EDM_MAX_WAIT_S")
    parser.add_argument("--seed", type=int, default=1, help="random workloads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (workers and in-process alike)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--quick", action="store_true", help="smoke run: short durations, few repeats")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.model is None:
        parser.error("no bundled model found; pass --model")
    if args.quick:
        args.repeats, args.singles = 2, 4
        args.warmup_s, args.closed_s, args.open_s, args.open_bound_s = 2.0, 10.0, 8.0, 8.0

    started = time.perf_counter()
    results = run(args)
    results["total_s"] = time.perf_counter() - started
    results["goals"] = [{"what": w, "value": v, "goal": g, "met": m} for w, v, g, m in goals(results)]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results},
                                        indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                                        else str(o)))
    print(table(results, args))
    print(f"(total {results['total_s']:.0f} s; worker and gateway logs: {', '.join(results['logs'].values())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
