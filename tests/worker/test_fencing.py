"""Fencing against a real Redis: once the reaper has given a job to another worker, every write of
the worker that held it before (started mark, progress, events, PNGs, terminal state) is refused in
Redis, and that worker learns which jobs it lost."""

from __future__ import annotations

import time

import redis

from contract.events import events_key
from contract.jobs import ImageInfo, JobResult, JobSpec, JobStatus, SamplerParams, WorkerInfo
from contract.ledger import Keys, Outcome
from service.ledger import Ledger
from worker.queue import WorkerQueue


def spec(images: int = 2) -> JobSpec:
    return JobSpec(model="m", seeds=list(range(images)), class_labels=[None] * images, sampler=SamplerParams())


def worker(conn: redis.Redis, name: str, ttl_s: float = 5.0) -> WorkerQueue:
    return WorkerQueue(conn, name, result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=ttl_s, max_reruns=2)


def beat(queue: WorkerQueue) -> None:
    queue.heartbeat(WorkerInfo(id=queue.id, models=["m"], device="cpu", dtype="fp32", pid=1, host="h",
                               started_at=time.time()))


def entries(conn: redis.Redis, job_id: str) -> list[tuple[str, str]]:
    """(type, claim) of each event in the job's stream."""
    return [(fields[b"type"].decode(), fields.get(b"claim", b"").decode())
            for _, fields in conn.xrange(events_key(job_id))]


def info(index: int) -> ImageInfo:
    return ImageInfo(index=index, seed=index, class_label=1, metadata={"k": str(index)})


def test_a_claim_sets_the_generation_and_holder_and_each_hand_over_moves_it_on(redis_conn: redis.Redis) -> None:
    book = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    job_id = book.submit(spec(), "o")[0]
    w = worker(redis_conn, "w1")

    def claim_fields() -> list[bytes | None]:
        return redis_conn.hmget(Keys.job(job_id), ["claim", "holder"])

    (job,) = w.claim("m", 1)
    assert claim_fields() == [b"1", b"w1"] and w.claims == {job_id: 1}
    w.unclaim([job])
    assert claim_fields() == [b"2", None] and w.claims == {}
    (job,) = w.claim_blocking("m", 1.0)
    assert claim_fields() == [b"3", b"w1"] and w.claims == {job_id: 3}
    assert w.finish([Outcome(job_id, JobStatus.cancelled)]) == {job_id}
    assert claim_fields() == [b"4", None] and w.claims == {}
    assert entries(redis_conn, job_id) == [("error", "3")]


def test_every_write_of_a_worker_whose_job_was_rerun_elsewhere_is_refused(redis_conn: redis.Redis) -> None:
    book = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    job_id = book.submit(spec(), "o", preview_every=1)[0]
    paused, survivor = worker(redis_conn, "paused", ttl_s=0.1), worker(redis_conn, "survivor")
    beat(paused)
    beat(survivor)
    (stale,) = paused.claim("m", 1)
    paused.mark_started(stale)
    assert paused.report({job_id: {"step": 3, "nfe_done": 5}}) == set()
    paused.publish_progress([(job_id, {"nfe": 5}, [])])
    assert entries(redis_conn, job_id) == [("started", "1"), ("progress", "1")]

    time.sleep(0.2)  # the paused worker's heartbeat expires; the survivor reaps and reruns its job
    assert survivor.reap() == [(job_id, "requeued")]
    (fresh,) = survivor.claim("m", 1)
    survivor.mark_started(fresh)
    assert redis_conn.hmget(Keys.job(job_id), ["claim", "holder", "worker"]) == [b"3", b"survivor", b"survivor"]

    # The paused worker resumes and goes on as if it still held the job: nothing it writes lands.
    before = {k: v for k, v in redis_conn.hgetall(Keys.job(job_id)).items()}
    paused.mark_started(stale)
    assert paused.report({job_id: {"step": 9, "nfe_done": 17}}) == set()
    assert paused.publish_progress([(job_id, {"nfe": 17}, [])]) == set()
    assert paused.store_images([(job_id, [(info(0), b"stale png")])]) == {job_id}
    assert paused.store_pngs([(job_id, 1, b"stale png")], [(job_id, info(1))]) == {job_id}
    result = JobResult(images=[info(0), info(1)], worker="paused", sampling_s=1.0)
    assert paused.finish([Outcome(job_id, JobStatus.succeeded, result=result)]) == set()
    assert redis_conn.hgetall(Keys.job(job_id)) == before
    assert redis_conn.mget([Keys.png(job_id, 0), Keys.png(job_id, 1)]) == [None, None]
    assert redis_conn.hlen(Keys.images(job_id)) == 0
    assert paused.take_lost() == {job_id} and paused.take_lost() == set() and paused.claims == {}
    assert book.status(job_id) is JobStatus.running

    # The survivor's writes all land, and every event after its started event carries its claim.
    assert survivor.report({job_id: {"step": 1, "nfe_done": 1}}) == set()
    survivor.publish_progress([(job_id, {"nfe": 1}, [])])
    assert survivor.store_images([(job_id, [(info(0), b"png0"), (info(1), b"png1")])]) == set()
    result = JobResult(images=[info(0), info(1)], worker="survivor", sampling_s=1.0)
    assert survivor.finish([Outcome(job_id, JobStatus.succeeded, result=result)]) == {job_id}
    assert survivor.take_lost() == set()
    assert entries(redis_conn, job_id) == [("started", "1"), ("progress", "1"), ("started", "3"), ("progress", "3"),
                                           ("image", "3"), ("image", "3"), ("done", "3")]
    assert book.pngs(job_id, 2) == [b"png0", b"png1"]
    record = book.record(job_id)
    assert record is not None and record.status is JobStatus.succeeded and record.result == result
    assert record.progress.nfe == 1  # the survivor's report, not the paused worker's

    # A job that ended cannot be written to by its last holder either.
    assert survivor.publish_progress([(job_id, {"nfe": 2}, [])]) == set()
    assert survivor.take_lost() == {job_id} and len(entries(redis_conn, job_id)) == 7


def test_a_blocking_claim_whose_job_was_taken_back_in_between_is_not_ours(redis_conn: redis.Redis) -> None:
    """BLMOVE then the script that takes the job: if the reaper moved the id away in between, the
    worker must not get a claim generation for a job that is not in its list."""
    book = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    job_id = book.submit(spec(), "o")[0]
    w = worker(redis_conn, "w1")
    redis_conn.lmove(Keys.queue("m"), w.claimed_key, "LEFT", "RIGHT")
    redis_conn.lrem(w.claimed_key, 1, job_id)  # what a reaper's requeue does, minus the push back
    assert w._account(keys=[Keys.job(job_id), Keys.QUEUED_NFE, w.claimed_key], args=[job_id, w.id]) is None
    assert redis_conn.hget(Keys.job(job_id), "claim") is None
