"""The worker's main loop against a real Redis and the tiny model: what happens when Redis or a job
misbehaves (lost replies, failed writes, unreadable specs, unexpected errors)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from contract.jobs import JobSpec, JobStatus, SamplerParams
from contract.ledger import JOB_FUNC, Keys
from service.ledger import Ledger
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.queue import WorkerQueue
from worker.runner import Worker

MODEL = "tiny"


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    served = Engine("cpu", "auto")
    served.load(MODEL, tiny_model)
    return served


def spec(*seeds: int, steps: int = 3) -> JobSpec:
    return JobSpec(model=MODEL, seeds=list(seeds), class_labels=[None] * len(seeds),
                   sampler=SamplerParams(num_steps=steps))


def book(conn: redis.Redis) -> Ledger:
    return Ledger(conn, result_ttl_s=60, failure_ttl_s=60)


def make_worker(conn: redis.Redis, engine: Engine, name: str = "w1") -> Worker:
    queue = WorkerQueue(conn, name, result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=5, max_reruns=2)
    return Worker(queue=queue, engine=engine, metrics=WorkerMetrics(), max_batch=8, max_wait_s=0.01,
                  heartbeat_interval_s=0.2, block_s=0.2)


def claim_behind_its_back(worker: Worker, n: int = 1) -> list[str]:
    """Run the claim script without telling the worker: what a retried claim (its first reply lost
    to a timeout) or a claim whose load raised leaves in edm:claimed:{worker}."""
    queue = worker.queue
    reply = queue._claim(keys=[Keys.queue(MODEL), queue.claimed_key, Keys.QUEUED_NFE], args=[n, queue.id])
    return [i.decode() for i in reply[0::2]]  # (id, claim generation) pairs


def queued(conn: redis.Redis) -> list[str]:
    return [i.decode() for i in conn.lrange(Keys.queue(MODEL), 0, -1)]


def failing_once(real: Callable[..., Any], error: Exception) -> Callable[..., Any]:
    """`real`, except that its first call raises `error` (a Redis blip at that exact point)."""
    calls = [0]

    def call(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise error
        return real(*args, **kwargs)

    return call


# defect: claimed ids the worker does not know of vanished on a clean shutdown

def test_give_back_requeues_claimed_ids_the_worker_never_learnt_of(redis_conn: redis.Redis,
                                                                   engine: Engine) -> None:
    ledger = book(redis_conn)
    ids = [ledger.submit(spec(i), "o")[0] for i in range(4)]
    worker = make_worker(redis_conn, engine)
    worker.held = worker.queue.claim(MODEL, 1)
    assert claim_behind_its_back(worker) == [ids[1]]
    worker._give_back()
    assert queued(redis_conn) == ids
    assert ledger.queued_nfe() == 4 * spec(0).nfe_total
    assert redis_conn.exists(worker.queue.claimed_key) == 0
    assert all(ledger.status(i) is JobStatus.queued for i in ids)


def test_retire_requeues_what_the_claimed_list_still_holds(redis_conn: redis.Redis) -> None:
    ledger = book(redis_conn)
    ids = [ledger.submit(spec(i), "o")[0] for i in range(3)]
    queue = WorkerQueue(redis_conn, "w1", result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=5, max_reruns=2)
    queue.claim(MODEL, 2)
    queue.retire()
    assert queued(redis_conn) == ids and queue.held() == []
    assert ledger.queued_nfe() == 3 * spec(0).nfe_total


def test_idle_worker_requeues_and_then_runs_claimed_ids_it_never_learnt_of(redis_conn: redis.Redis,
                                                                          engine: Engine) -> None:
    ledger = book(redis_conn)
    lost, other = ledger.submit(spec(1), "o")[0], ledger.submit(spec(2), "o")[0]
    worker = make_worker(redis_conn, engine)
    assert claim_behind_its_back(worker) == [lost]
    for _ in range(4):
        worker.step()
    assert ledger.status(lost) is JobStatus.succeeded and ledger.status(other) is JobStatus.succeeded
    assert worker.queue.held() == [] and worker.held == []


# defect: a Redis error while writing terminal states left the job "running" and stalled the worker

def test_terminal_write_that_failed_is_retried_and_other_work_still_runs(redis_conn: redis.Redis, engine: Engine,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = book(redis_conn)
    first = ledger.submit(spec(1), "o")[0]
    worker = make_worker(redis_conn, engine)
    monkeypatch.setattr(worker.queue, "finish", failing_once(worker.queue.finish, redis.TimeoutError("blip")))
    with pytest.raises(redis.TimeoutError):
        worker.step()  # sampled, stored the PNGs, then could not write the terminal state
    assert ledger.status(first) is JobStatus.running
    other = ledger.submit(spec(2, steps=4), "o")[0]  # other settings: never shares a batch with the first
    for _ in range(4):
        worker.step()
    assert ledger.status(first) is JobStatus.succeeded and ledger.status(other) is JobStatus.succeeded
    assert worker.held == [] and worker.queue.held() == []
    record = ledger.record(first)
    assert record is not None and record.result is not None and len(record.result.images) == 1


# defect: a spec this worker cannot read (a newer gateway's field) crashed every worker that claimed it

def test_job_whose_spec_does_not_validate_fails_with_a_reason_and_the_rest_runs(redis_conn: redis.Redis,
                                                                                 engine: Engine) -> None:
    ledger = book(redis_conn)
    good = ledger.submit(spec(1), "o")[0]
    newer = spec(2).model_dump(mode="json")
    newer["sampler"]["alpha"] = 1.0  # written by a newer gateway during a rolling upgrade
    Queue(MODEL, connection=redis_conn, serializer=JSONSerializer).enqueue_call(
        JOB_FUNC, kwargs={"spec": newer}, job_id="newer", result_ttl=60, failure_ttl=60, timeout=-1)
    redis_conn.hset(Keys.job("newer"), mapping={"owner": "o", "model": MODEL, "images": 1, "nfe": 5, "qnfe": 5,
                                                "reruns": 0, "cancel": 0, "created": time.time()})
    redis_conn.incrby(Keys.QUEUED_NFE, 5)
    worker = make_worker(redis_conn, engine)
    for _ in range(3):
        worker.step()
    assert ledger.status("newer") is JobStatus.failed
    assert "alpha" in (redis_conn.hget(Keys.job("newer"), "error") or b"").decode()
    assert ledger.status(good) is JobStatus.succeeded
    assert worker.queue.held() == [] and ledger.queued_nfe() == 0


def test_unexpected_error_gives_the_jobs_back_and_the_worker_goes_on(redis_conn: redis.Redis, engine: Engine,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = book(redis_conn)
    job_id = ledger.submit(spec(1), "o")[0]
    worker = make_worker(redis_conn, engine)
    monkeypatch.setattr(engine, "encode", failing_once(engine.encode, RuntimeError("a bug")))
    raised: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while ledger.status(job_id) is not JobStatus.succeeded and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.request_stop()
    thread.join(15)
    worker._stop.set()
    worker.cancels.join(5)  # it reads from redis_conn, which the fixture closes
    assert not thread.is_alive() and raised == []
    record = ledger.record(job_id)
    assert record is not None and record.status is JobStatus.succeeded and record.reruns == 1
    assert redis_conn.exists(worker.queue.claimed_key) == 0


def test_a_job_that_keeps_breaking_the_worker_fails_past_the_rerun_limit(redis_conn: redis.Redis, engine: Engine,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = book(redis_conn)
    job_id = ledger.submit(spec(1), "o")[0]
    worker = make_worker(redis_conn, engine)

    def broken(*_: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine, "encode", broken)
    for _ in range(worker.queue.max_reruns + 1):
        with pytest.raises(RuntimeError):
            worker.step()
        worker._recover(RuntimeError("a bug"))
    record = ledger.record(job_id)
    assert record is not None and record.status is JobStatus.failed and "a bug" in (record.error or "")
    assert worker.held == [] and worker.queue.held() == []
    assert worker.metrics.jobs.labels(MODEL, "failed")._value.get() == 1


# defect: a brief Redis error while reporting progress failed the whole batch

def test_redis_blips_during_sampling_do_not_fail_the_batch(redis_conn: redis.Redis, engine: Engine,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = book(redis_conn)
    ids = [ledger.submit(spec(i), f"owner{i}")[0] for i in range(3)]
    worker = make_worker(redis_conn, engine)
    for name in ("report", "publish_progress", "preview_every"):
        monkeypatch.setattr(worker.queue, name, failing_once(getattr(worker.queue, name), redis.TimeoutError("blip")))
    worker.step()
    for job_id in ids:
        record = ledger.record(job_id)
        assert record is not None and record.status is JobStatus.succeeded, record


# the heartbeat thread, which also runs the reaper

def test_heartbeat_thread_survives_an_unexpected_error_in_the_reaper(redis_conn: redis.Redis, engine: Engine,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    worker = make_worker(redis_conn, engine)
    worker.heartbeat_interval_s = 0.02
    calls = [0]
    real = worker.queue.reap

    def reap() -> list[tuple[str, str]]:
        calls[0] += 1
        return real() if calls[0] > 1 else [][0]  # IndexError: a bug, not a Redis error

    monkeypatch.setattr(worker.queue, "reap", reap)
    thread = threading.Thread(target=worker._heartbeat_loop, daemon=True)
    thread.start()
    time.sleep(0.3)
    worker._stop.set()
    thread.join(5)
    assert calls[0] >= 3


def test_jobs_the_reaper_fails_count_as_failed_jobs(redis_conn: redis.Redis, engine: Engine) -> None:
    ledger = book(redis_conn)
    job_id = ledger.submit(spec(1), "o")[0]
    dead = WorkerQueue(redis_conn, "dead", result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=0.1, max_reruns=0)
    dead.heartbeat(make_worker(redis_conn, engine, "dead")._info)
    dead.claim(MODEL, 1)
    time.sleep(0.2)
    worker = make_worker(redis_conn, engine)
    worker.queue.max_reruns = 0
    thread = threading.Thread(target=worker._heartbeat_loop, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while ledger.status(job_id) is not JobStatus.failed and time.monotonic() < deadline:
        time.sleep(0.02)
    worker._stop.set()
    thread.join(5)
    assert ledger.status(job_id) is JobStatus.failed
    assert worker.metrics.jobs.labels(MODEL, "failed")._value.get() == 1
    assert worker.metrics.reaped.labels("failed")._value.get() == 1
