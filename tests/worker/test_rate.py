"""The rate a step worker reports in its heartbeat (what the gateway's Retry-After divides by) is how fast
it gets through work: the loop's time between forward passes counts, waiting for work does not."""

from __future__ import annotations

import time

import redis

from service.ledger import Ledger
from tests.integration.servers import wait_until
from tests.worker.test_stepper import MODEL, engine, make_worker, spec, start  # noqa: F401
from worker.engine import Engine

OVERHEAD_S = 0.1  # added to every turn of the loop, outside the forward pass


def test_reported_rate_counts_the_time_between_passes(redis_conn: redis.Redis, engine: Engine) -> None:  # noqa: F811
    ledger = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    worker = make_worker(redis_conn, engine)
    real_claim = worker._claim

    def slow_claim() -> None:  # called once per turn, before the pass
        time.sleep(OVERHEAD_S)
        real_claim()

    worker._claim = slow_claim  # type: ignore[method-assign]
    thread, _ = start(worker)
    job_id, _ = ledger.submit(spec(1, 2, 3, 4, steps=12), "o")  # 4 rows (one pass each turn), 23 turns
    wait_until(lambda: ledger.status(job_id).terminal, 60)  # type: ignore[union-attr]
    time.sleep(1.0)  # idle for a while: waiting for work is not part of the rate
    worker.request_stop()
    thread.join(30)
    passes = worker.metrics.passes.labels(MODEL)._value.get()
    pass_s = worker.metrics.pass_seconds.labels(MODEL)._sum.get()
    turns = 4 / (pass_s / passes + OVERHEAD_S)  # a full pass per turn, each turn at least this long
    per_pass = 4 / (pass_s / passes)  # what the pass alone would give (the earlier measure): several times more
    assert 0.5 * turns < worker.nfe_per_s < 1.1 * turns < per_pass / 2, (worker.nfe_per_s, turns, per_pass)
