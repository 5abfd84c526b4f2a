"""The gateway's side loops: the shared blocking pool, the loop watch behind liveness, and the probe
server on a loop of its own (real uvicorn, real HTTP)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from service.errors import Problem
from service.loops import LoopThread, LoopWatch, blocking, use_pool
from service.probes import ProbeServer


class Ready:
    """A readiness monitor's answer() that a test can flip."""

    def __init__(self) -> None:
        self.ready = True

    def answer(self) -> dict[str, object]:
        if not self.ready:
            raise Problem(503, "no live worker serves: tiny", headers={"Retry-After": "2"})
        return {"status": "ready", "workers": {"tiny": 1}}


def test_blocking_runs_on_the_pool_set_for_its_loop() -> None:
    pool = ThreadPoolExecutor(2, thread_name_prefix="edm-test-pool")
    side = LoopThread("side").start()

    async def name_of_thread() -> str:
        return await blocking(lambda: threading.current_thread().name)

    async def main() -> tuple[str, str, str]:
        use_pool(asyncio.get_running_loop(), pool)
        here = await name_of_thread()
        unset = await side.call(name_of_thread())  # a loop with no pool set: its default executor
        side.call_soon(lambda: use_pool(side.loop, pool))
        there = await side.call(name_of_thread())
        return here, unset, there

    try:
        here, unset, there = asyncio.run(main())
    finally:
        side.stop()
        pool.shutdown()
    assert here.startswith("edm-test-pool") and there.startswith("edm-test-pool")
    assert not unset.startswith("edm-test-pool")


def test_blocking_calls_see_the_callers_context() -> None:
    """Logs written in a blocking call carry the request's id (a context variable set by the middleware)."""
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")

    async def main() -> str:
        request_id.set("r-42")
        return await blocking(request_id.get)

    assert asyncio.run(main()) == "r-42"


def test_the_loop_watch_names_a_loop_that_stopped_turning() -> None:
    now = [100.0]
    watch = LoopWatch(stall_s=10, clock=lambda: now[0])
    watch.turned.update(rest=100.0, grpc=100.0)
    now[0] = 109.0
    assert watch.stalled() == {}
    watch.turned["rest"] = 109.0
    now[0] = 112.5
    assert watch.stalled() == {"grpc": 12.5}


@pytest.fixture()
def probes() -> Any:
    registry = CollectorRegistry()
    Counter("edm_test_probe", "a metric the probe port must serve", registry=registry).inc()
    state = SimpleNamespace(readiness=Ready(), loops=LoopWatch(stall_s=0.6, every_s=0.1),
                            metrics=SimpleNamespace(registry=registry))
    side = LoopThread("rest-stand-in").start()
    try:
        side.call_soon(lambda: side.loop.create_task(state.loops.beat("rest")))

        async def start() -> ProbeServer:
            return await ProbeServer(state, "127.0.0.1", 0).start()

        server = asyncio.run(start())  # its loop is its own thread's; this one only starts it
        try:
            yield SimpleNamespace(url=f"http://127.0.0.1:{server.port}", state=state, side=side)
        finally:
            asyncio.run(server.stop())
    finally:
        side.stop()


def test_the_probe_port_answers_health_readiness_and_metrics(probes: Any) -> None:
    assert httpx.get(probes.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(probes.url + "/readyz").json()["status"] == "ready"
    assert "edm_test_probe_total 1.0" in httpx.get(probes.url + "/metrics").text
    probes.state.readiness.ready = False
    answer = httpx.get(probes.url + "/readyz")
    assert answer.status_code == 503 and answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["detail"] == "no live worker serves: tiny"
    assert httpx.get(probes.url + "/v1/models").status_code == 404  # the probe port serves nothing else


def test_liveness_fails_while_a_loop_is_stuck_and_the_probe_port_still_answers(probes: Any) -> None:
    assert httpx.get(probes.url + "/healthz").status_code == 200
    probes.side.call_soon(lambda: time.sleep(2.0))  # the stand-in for the REST loop hangs for 2 s
    time.sleep(1.0)
    started = time.monotonic()
    answer = httpx.get(probes.url + "/healthz", timeout=5)
    assert time.monotonic() - started < 0.9  # answered while the other loop is stuck (for 1 s more)
    assert answer.status_code == 503
    assert answer.json()["detail"].startswith("event loops not turning: rest for ")
    assert set(answer.json()["stalled"]) == {"rest"}
    time.sleep(1.5)  # the loop turns again
    assert httpx.get(probes.url + "/healthz").status_code == 200


def test_liveness_fails_while_the_rest_port_does_not_listen(probes: Any) -> None:
    """edm-serve gateway reports it (GatewayServer): false before uvicorn listens and once it stops."""
    probes.state.loops.rest_listening = False
    answer = httpx.get(probes.url + "/healthz")
    assert answer.status_code == 503 and "not listening" in answer.json()["detail"]
    probes.state.loops.rest_listening = True
    assert httpx.get(probes.url + "/healthz").status_code == 200


def test_a_probe_port_in_use_fails_the_start() -> None:
    taken = ProbeServer(SimpleNamespace(readiness=Ready(), loops=LoopWatch(1), metrics=None), "127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            ProbeServer(SimpleNamespace(readiness=Ready(), loops=LoopWatch(1), metrics=None), "127.0.0.1", taken.port)
    finally:
        taken.socket.close()
