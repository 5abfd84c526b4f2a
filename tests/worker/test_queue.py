"""The worker's Redis adapter against a real Redis: claims, accounting, finishing, reaping."""

from __future__ import annotations

import time

import redis

from contract.jobs import ImageInfo, JobResult, JobSpec, JobStatus, SamplerParams, WorkerInfo
from contract.ledger import Outcome
from service.ledger import Ledger
from worker.queue import WorkerQueue


def ledger(conn: redis.Redis) -> Ledger:
    return Ledger(conn, result_ttl_s=60, failure_ttl_s=60)


def spec(images: int = 2, model: str = "m") -> JobSpec:
    return JobSpec(model=model, seeds=list(range(images)), class_labels=[None] * images, sampler=SamplerParams())


def worker(conn: redis.Redis, name: str, ttl_s: float = 5.0, max_reruns: int = 2) -> WorkerQueue:
    return WorkerQueue(conn, name, result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=ttl_s, max_reruns=max_reruns)


def beat(queue: WorkerQueue) -> None:
    queue.heartbeat(WorkerInfo(id=queue.id, models=["m"], device="cpu", dtype="fp32", pid=1, host="h",
                               started_at=time.time()))


def test_claim_and_unclaim_keep_order_and_queued_nfe(redis_conn: redis.Redis) -> None:
    book = ledger(redis_conn)
    ids = [book.submit(spec(), "o")[0] for _ in range(3)]
    assert book.queued_nfe() == 3 * 70
    w = worker(redis_conn, "w1")
    claimed = w.claim("m", 2)
    assert [c.id for c in claimed] == ids[:2] and claimed[0].spec == spec()
    assert w.held() == ids[:2] and book.queued_nfe() == 70
    w.unclaim(claimed)
    assert redis_conn.lrange("rq:queue:m", 0, -1) == [i.encode() for i in ids]
    assert book.queued_nfe() == 210 and w.held() == []
    assert book.status(ids[0]) is JobStatus.queued


def test_claim_blocking_waits_then_returns(redis_conn: redis.Redis) -> None:
    w = worker(redis_conn, "w1")
    started = time.monotonic()
    assert w.claim_blocking("m", 0.2) == []
    assert 0.15 < time.monotonic() - started < 1.0
    job_id = ledger(redis_conn).submit(spec(), "o")[0]
    assert [c.id for c in w.claim_blocking("m", 1.0)] == [job_id]
    assert ledger(redis_conn).queued_nfe() == 0


def test_success_is_recorded_the_rq_way(redis_conn: redis.Redis) -> None:
    book = ledger(redis_conn)
    job_id = book.submit(spec(1), "o")[0]
    w = worker(redis_conn, "w1")
    (job,) = w.claim("m", 1)
    w.mark_started(job)
    assert book.status(job_id) is JobStatus.running
    assert redis_conn.zcard("rq:wip:m") == 1
    w.store_pngs([(job_id, 0, b"png0")])
    result = JobResult(images=[ImageInfo(index=0, seed=0, class_label=3, metadata={"k": "v"})], worker="w1",
                       sampling_s=0.5)
    assert w.finish([Outcome(job_id, JobStatus.succeeded, result=result)]) == {job_id}
    record = book.record(job_id)
    assert record is not None and record.status is JobStatus.succeeded and record.result == result
    assert record.started_at is not None and record.finished_at is not None
    assert book.png(job_id, 0) == b"png0"
    assert w.held() == [] and redis_conn.zcard("rq:wip:m") == 0 and redis_conn.zcard("rq:finished:m") == 1
    assert book.status(job_id) is JobStatus.succeeded
    assert redis_conn.ttl(f"rq:job:{job_id}") > 0 and redis_conn.ttl(f"edm:job:{job_id}") > 0


def test_dead_workers_jobs_are_requeued_then_failed_past_the_limit(redis_conn: redis.Redis) -> None:
    book = ledger(redis_conn)
    first, second = book.submit(spec(), "o")[0], book.submit(spec(), "o")[0]
    survivor = worker(redis_conn, "alive", max_reruns=1)
    beat(survivor)
    for death in range(2):
        dead = worker(redis_conn, f"dead{death}", ttl_s=0.1, max_reruns=1)
        beat(dead)
        claimed = dead.claim("m", 2)
        for job in claimed:
            dead.mark_started(job)
        assert book.queued_nfe() == 0
        assert survivor.reap() == []  # heartbeat still fresh
        time.sleep(0.2)
        outcomes = survivor.reap()
        assert dead.finish([Outcome(claimed[0].id, JobStatus.cancelled)]) == set()  # not its job now
        if death == 0:
            assert outcomes == [(second, "requeued"), (first, "requeued")]
            assert redis_conn.lrange("rq:queue:m", 0, -1) == [first.encode(), second.encode()]
            record = book.record(first)
            assert record is not None and record.status is JobStatus.queued and record.reruns == 1
            assert book.queued_nfe() == 140 and redis_conn.zcard("rq:wip:m") == 0
        else:
            assert sorted(outcomes) == sorted([(first, "failed"), (second, "failed")])
            record = book.record(first)
            assert record is not None and record.status is JobStatus.failed and "died 2 times" in record.error
        assert redis_conn.sismember("edm:workers", dead.id) == 0


def test_cancel_of_a_claimed_job_sets_the_flag_and_publishes(redis_conn: redis.Redis) -> None:
    book = ledger(redis_conn)
    job_id = book.submit(spec(), "o")[0]
    w = worker(redis_conn, "w1")
    w.claim("m", 1)
    pubsub = redis_conn.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("edm:cancel")
    pubsub.get_message(timeout=0.2)
    assert book.cancel(job_id) is JobStatus.queued  # claimed, not started: the worker decides
    assert w.cancel_requested([job_id]) == {job_id}
    message = pubsub.get_message(timeout=1.0)
    assert message is not None and message["data"] == job_id.encode()
    assert w.finish([Outcome(job_id, JobStatus.cancelled)]) == {job_id}
    assert book.status(job_id) is JobStatus.cancelled
    pubsub.close()


def test_reaper_trims_expired_entries_from_the_rq_registries(redis_conn: redis.Redis) -> None:
    book = Ledger(redis_conn, result_ttl_s=1, failure_ttl_s=1)
    ids = [book.submit(spec(1), "o")[0] for _ in range(3)]
    w = WorkerQueue(redis_conn, "w1", result_ttl_s=1, failure_ttl_s=1, heartbeat_ttl_s=5, max_reruns=2)
    w.claim("m", 3)
    result = JobResult(images=[], worker="w1", sampling_s=0.0)
    w.finish([Outcome(ids[0], JobStatus.succeeded, result=result), Outcome(ids[1], JobStatus.failed, error="x"),
              Outcome(ids[2], JobStatus.cancelled)])
    registries = ["rq:finished:m", "rq:failed:m", "rq:canceled:m"]
    assert w.reap() == []
    assert [redis_conn.zcard(key) for key in registries] == [1, 1, 1]  # not expired yet
    time.sleep(1.1)
    assert w.reap() == []
    assert [redis_conn.zcard(key) for key in registries] == [0, 0, 0]


def test_a_requeued_job_forgets_its_dead_run(redis_conn: redis.Redis) -> None:
    book = ledger(redis_conn)
    job_id = book.submit(spec(), "o")[0]
    survivor = worker(redis_conn, "alive")
    beat(survivor)
    dead = worker(redis_conn, "dead", ttl_s=0.1)
    beat(dead)
    (job,) = dead.claim("m", 1)
    dead.mark_started(job)
    time.sleep(0.2)
    assert survivor.reap() == [(job_id, "requeued")]
    record = book.record(job_id)
    assert record is not None and record.status is JobStatus.queued and record.started_at is None
    assert redis_conn.hmget(f"edm:job:{job_id}", ["worker", "execution"]) == [None, None]
    assert redis_conn.hmget(f"rq:job:{job_id}", ["worker_name", "started_at"]) == [None, None]
