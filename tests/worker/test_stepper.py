"""The step scheduler's loop against a real Redis and the tiny model: a hung loop is detected, a drain
gives back partly done jobs with their stored images, cancellation frees rows at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from contract.jobs import JobSpec, SamplerParams
from contract.ledger import CLAIM, Keys
from service.ledger import Ledger
from tests.integration.servers import wait_until
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.queue import WorkerQueue
from worker.stepper import StepWorker

MODEL = "tiny"


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    served = Engine("cpu", "auto", max_pass_rows=4)
    served.load(MODEL, tiny_model)
    return served


def spec(*seeds: int, steps: int = 3, model: str = MODEL) -> JobSpec:
    return JobSpec(model=model, seeds=list(seeds), class_labels=[None] * len(seeds),
                   sampler=SamplerParams(num_steps=steps))


def make_worker(conn: redis.Redis, engine: Engine, name: str = "w1", **options: float) -> StepWorker:
    queue = WorkerQueue(conn, name, result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=5, max_reruns=2)
    return StepWorker(queue=queue, engine=engine, metrics=WorkerMetrics(), slot_rows=4, cohort_rows=2,
                      heartbeat_interval_s=0.1, block_s=options.pop("block_s", 0.1), **options)  # type: ignore[arg-type]


def start(worker: StepWorker) -> tuple[threading.Thread, list[int]]:
    code: list[int] = []

    def run() -> None:
        code.append(worker.run())
        worker.cancels.join(5)  # its listener shares the test's connection: let it stop first

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, code


def test_a_hung_loop_stops_heartbeating_and_its_job_is_rerun_elsewhere(redis_conn: redis.Redis,
                                                                       engine: Engine) -> None:
    ledger = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    worker = make_worker(redis_conn, engine, hang_timeout_s=1.0)
    release = threading.Event()
    real_step = worker.tables[MODEL].step
    passes = [0]

    def stuck_after_two() -> object:
        passes[0] += 1
        if passes[0] > 2:
            release.wait(30)
        return real_step()

    worker.tables[MODEL].step = stuck_after_two  # type: ignore[method-assign]
    thread, code = start(worker)
    job_id, _ = ledger.submit(spec(1, 2, steps=20), "o")
    wait_until(lambda: redis_conn.exists(Keys.heartbeat("w1")) and passes[0] > 2, 20)
    hung_at = time.monotonic()
    wait_until(lambda: not redis_conn.exists(Keys.heartbeat("w1")), 10)
    assert time.monotonic() - hung_at < 3.0 and worker.metrics.hung._value.get() == 1
    # Another worker's reaper gives the job back to its queue at once (no heartbeat TTL to wait out).
    other = WorkerQueue(redis_conn, "w2", result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=5, max_reruns=2)
    assert other.reap() == [(job_id, "requeued")]
    assert ledger.record(job_id).reruns == 1  # type: ignore[union-attr]
    release.set()
    thread.join(20)
    assert code == [1]
    assert redis_conn.lrange(Keys.queue(MODEL), 0, -1) == [job_id.encode()]  # still queued, nothing written
    assert not redis_conn.hlen(Keys.images(job_id))


def test_drain_finishes_what_is_in_the_table_and_gives_back_the_rest(redis_conn: redis.Redis,
                                                                      engine: Engine) -> None:
    ledger = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    worker = make_worker(redis_conn, engine)
    thread, code = start(worker)
    big, _ = ledger.submit(spec(*range(10), steps=30), "o")  # 4 rows at a time: 3 waves or more
    wait_until(lambda: redis_conn.hlen(Keys.images(big)) >= 2, 60, interval_s=0.01)
    waiting, _ = ledger.submit(spec(50, steps=3), "o")
    worker.request_stop()
    thread.join(60)
    assert code == [0]
    stored = redis_conn.hlen(Keys.images(big))
    assert 2 <= stored < 10
    assert redis_conn.lrange(Keys.queue(MODEL), 0, -1) == [big.encode(), waiting.encode()]
    assert ledger.record(big).reruns == 0 and ledger.status(waiting).value == "queued"  # type: ignore[union-attr]
    # A second worker reruns only the missing images; the job ends with all ten, in order.
    second = make_worker(redis_conn, engine, name="w2")
    thread, _ = start(second)
    wait_until(lambda: ledger.status(big).terminal and ledger.status(waiting).terminal, 60)  # type: ignore[union-attr]
    second.request_stop()
    thread.join(30)
    record = ledger.record(big)
    assert record is not None and [image.seed for image in record.result.images] == list(range(10))  # type: ignore[union-attr]
    assert second.metrics.images.labels(MODEL)._value.get() == 10 - stored + 1


def test_a_job_that_arrives_during_a_pass_is_claimed_before_the_pass_ends(redis_conn: redis.Redis,
                                                                          engine: Engine) -> None:
    """Claims run on a thread of their own beside the forward pass: the loop does not wait for them, and
    a job that arrives while a pass runs is claimed then, to enter right after it."""
    ledger = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    worker = make_worker(redis_conn, engine, block_s=1.0)
    real_step = worker.tables[MODEL].step
    slow_passes, in_pass = [0], threading.Event()

    def step() -> object:
        if slow_passes[0] >= 0:
            slow_passes[0] += 1
            in_pass.set()
            time.sleep(1.5)
            in_pass.clear()
        return real_step()

    slow_passes[0] = -1  # fast until the long job runs
    worker.tables[MODEL].step = step  # type: ignore[method-assign]
    thread, _ = start(worker)
    long, _ = ledger.submit(spec(1, steps=20), "o")
    wait_until(lambda: worker.tables[MODEL].rows_of(long) == 1, 20, interval_s=0.01)
    slow_passes[0] = 0
    # From the second slow pass on, the claim beside it waits about as long as a pass for a job.
    wait_until(lambda: slow_passes[0] >= 2 and in_pass.is_set(), 20, interval_s=0.005)
    small, _ = ledger.submit(spec(9, steps=3), "o")
    wait_until(lambda: redis_conn.hget(Keys.job(small), "holder") == b"w1", 5, interval_s=0.005)
    assert in_pass.is_set() and slow_passes[0] == 2  # claimed while that pass still ran
    # The claim goes on through the pass: a job arriving later in it is claimed in it too.
    time.sleep(0.2)
    second, _ = ledger.submit(spec(10, steps=3), "o")
    wait_until(lambda: redis_conn.hget(Keys.job(second), "holder") == b"w1", 5, interval_s=0.005)
    assert in_pass.is_set() and slow_passes[0] == 2
    wait_until(lambda: worker.tables[MODEL].rows_of(small) == 1, 10, interval_s=0.005)
    assert slow_passes[0] in (2, 3)  # and admitted right after it
    slow_passes[0] = -1
    ledger.cancel(long)
    wait_until(lambda: ledger.status(small).value == "succeeded", 30)  # type: ignore[union-attr]
    wait_until(lambda: ledger.status(second).value == "succeeded", 30)  # type: ignore[union-attr]
    worker.request_stop()
    thread.join(30)


def test_a_claim_that_fails_beside_the_pass_loses_no_job(redis_conn: redis.Redis, engine: Engine) -> None:
    """The claim thread takes one job, then its next claim moves two more ids into the claimed list and
    its reply is lost (a Redis timeout): the job it handed over runs, the error reaches the loop as a
    claim of its own would, and the two ids the worker never learnt of go back to the queue and run."""
    ledger = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    worker = make_worker(redis_conn, engine, block_s=1.0)
    real_claim, lost = worker.queue.claim, [0]

    def claim_losing_its_reply(model: str, n: int) -> list:  # type: ignore[type-arg]
        jobs = real_claim(model, n)
        if jobs and not lost[0]:
            lost[0] = len(jobs)
            raise redis.TimeoutError("reply lost")
        return jobs

    real_wait, submitted = worker.queue.claim_blocking, threading.Event()

    def wait_in_claim_thread_until_submitted(model: str, timeout_s: float) -> list:  # type: ignore[type-arg]
        if threading.current_thread().name.startswith("claim"):
            submitted.wait(10)
        return real_wait(model, timeout_s)

    worker.queue.claim = claim_losing_its_reply  # type: ignore[method-assign]
    worker.queue.claim_blocking = wait_in_claim_thread_until_submitted  # type: ignore[method-assign]
    thread, _ = start(worker)
    long, _ = ledger.submit(spec(1, steps=60), "o")
    wait_until(lambda: worker.tables[MODEL].rows_of(long) == 1, 20, interval_s=0.01)
    small = [ledger.submit(spec(10 + k, steps=3), "o")[0] for k in range(3)]
    submitted.set()  # the claim thread's wait takes the first at once, its sweep the other two
    wait_until(lambda: all(ledger.status(job).terminal for job in [long, *small]), 60)  # type: ignore[union-attr]
    worker.request_stop()
    thread.join(30)
    assert lost[0] == 2
    for job in [long, *small]:
        record = ledger.record(job)
        assert record is not None and record.status.value == "succeeded" and record.reruns == 0
    assert redis_conn.llen(worker.queue.claimed_key) == 0 and not redis_conn.llen(Keys.queue(MODEL))
    # Claim generations: claimed once and ended (2) for the job handed over; claimed, given back by
    # the worker's reconciliation, claimed again and ended (4) for the two whose claim reply was lost.
    generations = [int(redis_conn.hget(Keys.job(job), CLAIM) or 0) for job in [long, *small]]
    assert generations == [2, 2, 4, 4]


def test_cancel_frees_rows_for_the_next_job(redis_conn: redis.Redis, engine: Engine) -> None:
    ledger = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    worker = make_worker(redis_conn, engine)
    thread, _ = start(worker)
    long, _ = ledger.submit(spec(1, 2, 3, 4, steps=400), "o")
    wait_until(lambda: worker.tables[MODEL].rows_of(long) == 4, 20, interval_s=0.01)
    small, _ = ledger.submit(spec(9, steps=3), "o")
    time.sleep(0.3)
    assert worker.tables[MODEL].rows_of(small) == 0 and ledger.status(small).value == "queued"  # type: ignore[union-attr]
    ledger.cancel(long)
    wait_until(lambda: ledger.status(small).value == "succeeded", 20)  # type: ignore[union-attr]
    assert ledger.status(long).value == "cancelled"  # type: ignore[union-attr]
    worker.request_stop()
    thread.join(30)


def test_two_models_take_turns(redis_conn: redis.Redis, tiny_model: Path) -> None:
    """One worker, two models: passes alternate between the tables that hold work, so neither waits
    for the other to drain."""
    served = Engine("cpu", "auto", max_pass_rows=4)
    served.load("a", tiny_model)
    served.load("b", tiny_model)
    ledger = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    worker = make_worker(redis_conn, served)
    order: list[str] = []
    for name, table in worker.tables.items():
        real = table.step

        def step(real=real, name=name):  # type: ignore[no-untyped-def]
            order.append(name)
            return real()
        table.step = step  # type: ignore[method-assign]
    thread, _ = start(worker)
    long_a, _ = ledger.submit(spec(1, steps=40, model="a"), "o")
    wait_until(lambda: "a" in order, 20, interval_s=0.01)
    short_b, _ = ledger.submit(spec(2, steps=3, model="b"), "o")
    wait_until(lambda: ledger.status(short_b).value == "succeeded", 30)  # type: ignore[union-attr]
    assert ledger.status(long_a).value == "running"  # type: ignore[union-attr]
    b_passes = [k for k, name in enumerate(order) if name == "b"]
    assert len(b_passes) == 5 and all(order[k - 1] == "a" for k in b_passes)  # alternating while both had work
    worker.request_stop()
    thread.join(30)
