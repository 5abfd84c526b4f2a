"""An image that comes out non-finite is never reported succeeded: under both schedulers its job fails
with a reason. The settings checks refuse what the sampler cannot compute; this is the line behind them,
for a network that answers NaN on its own (here: the tiny model, poisoned for one class)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from contract.jobs import JobSpec, JobStatus, SamplerParams
from contract.ledger import Keys
from service.ledger import Ledger
from tests.integration.servers import wait_until
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.queue import WorkerQueue
from worker.runner import Worker
from worker.stepper import StepWorker

MODEL = "tiny"
POISONED_CLASS = 9


@pytest.fixture()
def engine(tiny_model: Path) -> Engine:
    """The tiny model, except that the rows asking for POISONED_CLASS come out NaN."""
    served = Engine("cpu", "auto", max_pass_rows=4)
    served.load(MODEL, tiny_model)
    net = served.models[MODEL].net
    real = net.forward

    def forward(x: torch.Tensor, sigma: Any, class_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        out = real(x, sigma, class_labels, **kwargs)
        if class_labels is not None:
            out[class_labels.argmax(1) == POISONED_CLASS] = float("nan")
        return out

    net.forward = forward  # type: ignore[method-assign]
    return served


def spec(seed: int, label: int, steps: int = 3) -> JobSpec:
    return JobSpec(model=MODEL, seeds=[seed], class_labels=[label], sampler=SamplerParams(num_steps=steps))


def error_of(conn: redis.Redis, job_id: str) -> str:
    return (conn.hget(Keys.job(job_id), "error") or b"").decode()


def queue(conn: redis.Redis, name: str) -> WorkerQueue:
    return WorkerQueue(conn, name, result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=5, max_reruns=2)


def test_step_scheduler_fails_the_job_with_a_reason_and_the_other_job_succeeds(redis_conn: redis.Redis,
                                                                               engine: Engine) -> None:
    ledger = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    worker = StepWorker(queue=queue(redis_conn, "step"), engine=engine, metrics=WorkerMetrics(), slot_rows=4,
                        cohort_rows=2, heartbeat_interval_s=0.1, block_s=0.1)
    bad, _ = ledger.submit(spec(1, POISONED_CLASS), "o")
    good, _ = ledger.submit(spec(2, 1), "o")  # same settings: one cohort, one pass with the bad job's rows

    def run() -> None:
        worker.run()
        worker.cancels.join(5)  # its listener shares the test's connection: let it stop first

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: all(ledger.status(j) in (JobStatus.failed, JobStatus.succeeded) for j in (bad, good)), 30)
    finally:
        worker.request_stop()
        thread.join(30)
    assert ledger.status(bad) is JobStatus.failed and "non-finite" in error_of(redis_conn, bad)
    assert ledger.status(good) is JobStatus.succeeded
    assert ledger.png(bad, 0) is None


def test_request_scheduler_fails_the_job_with_a_reason(redis_conn: redis.Redis, engine: Engine) -> None:
    ledger = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    worker = Worker(queue=queue(redis_conn, "request"), engine=engine, metrics=WorkerMetrics(), max_batch=8,
                    max_wait_s=0.01, heartbeat_interval_s=0.2, block_s=0.2)
    bad = ledger.submit(spec(1, POISONED_CLASS), "o")[0]
    good = ledger.submit(spec(2, 1, steps=4), "o")[0]  # other settings: a batch of its own
    for _ in range(4):
        worker.step()
    assert ledger.status(bad) is JobStatus.failed and "non-finite" in error_of(redis_conn, bad)
    assert ledger.status(good) is JobStatus.succeeded
    assert ledger.png(bad, 0) is None and worker.queue.held() == []
