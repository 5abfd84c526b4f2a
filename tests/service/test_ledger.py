"""The gateway's ledger operations against a real Redis, where two round trips could interleave or fail
half-way: cancelling a queued job, Idempotency-Key races."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

import service.ledger
from contract.jobs import JobSpec, JobStatus
from contract.ledger import Keys
from service.ledger import Ledger

MODEL = "tiny"


def book(conn: redis.Redis) -> Ledger:
    return Ledger(conn, result_ttl_s=60, failure_ttl_s=60)


def spec(*seeds: int) -> JobSpec:
    return JobSpec(model=MODEL, seeds=list(seeds), class_labels=[None] * len(seeds))


def test_cancel_of_a_queued_job_is_all_or_nothing(redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = book(redis_conn)
    job_id = ledger.submit(spec(1), "o")[0]
    nfe = spec(1).nfe_total

    def redis_went_away(*_: Any, **__: Any) -> None:
        raise redis.ConnectionError("Redis went away mid-cancel")

    monkeypatch.setattr(service.ledger, "finish", redis_went_away)
    with pytest.raises(redis.ConnectionError):
        ledger.cancel(job_id)
    monkeypatch.undo()
    assert redis_conn.lpos(Keys.queue(MODEL), job_id) == 0  # still queued, still counted
    assert ledger.queued_nfe() == nfe and int(redis_conn.hget(Keys.job(job_id), "qnfe")) == nfe
    assert ledger.status(job_id) is JobStatus.queued
    assert ledger.cancel(job_id) is JobStatus.cancelled  # the client's retry works
    assert ledger.status(job_id) is JobStatus.cancelled and ledger.queued_nfe() == 0
    assert redis_conn.llen(Keys.queue(MODEL)) == 0 and redis_conn.hexists(Keys.job(job_id), "finished")


def test_concurrent_requests_with_one_idempotency_key_make_one_job(redis_conn: redis.Redis, redis_server: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = book(redis_conn), book(redis_server.client())
    answers: list[tuple[str, bool]] = []
    real_queue = first.queue

    def queue_after_the_other_request(model: str) -> Any:
        if not answers:  # the second request runs while the first is half-way through its submit
            answers.append(second.submit(spec(1), "o", idempotency_key="k", body_hash="h"))
        return real_queue(model)

    monkeypatch.setattr(first, "queue", queue_after_the_other_request)
    answers.append(first.submit(spec(1), "o", idempotency_key="k", body_hash="h"))
    (other_id, other_created), (job_id, created) = answers
    assert job_id == other_id and [other_created, created].count(True) == 1
    assert redis_conn.llen(Keys.queue(MODEL)) == 1 and ledger_jobs(redis_conn) == 1
    assert first.queued_nfe() == spec(1).nfe_total


def test_idempotency_key_of_an_expired_job_makes_a_new_job(redis_conn: redis.Redis) -> None:
    ledger = book(redis_conn)
    old = ledger.submit(spec(1), "o", idempotency_key="k", body_hash="h")[0]
    assert ledger.submit(spec(1), "o", idempotency_key="k", body_hash="h") == (old, False)
    with pytest.raises(service.ledger.IdempotencyConflict):
        ledger.submit(spec(2), "o", idempotency_key="k", body_hash="other")
    redis_conn.delete(Keys.job(old), Keys.rq_job(old))  # expired
    new, created = ledger.submit(spec(1), "o", idempotency_key="k", body_hash="h")
    assert created and new != old
    assert ledger.submit(spec(1), "o", idempotency_key="k", body_hash="h") == (new, False)


def test_concurrent_submissions_of_one_gateway_take_turns_instead_of_trying_again(redis_conn: redis.Redis) -> None:
    """Every submission adds to edm:queued_nfe, which the others WATCH: without turns, a burst of them
    keeps undoing each other (4.2 tries per job measured with 64 at once)."""
    ledger = book(redis_conn)

    def watches() -> int:
        return int(redis_conn.info("commandstats").get("cmdstat_watch", {}).get("calls", 0))

    before = watches()
    ledger.submit(spec(0), "o", max_queued_nfe=10**9)
    per_job = watches() - before
    before = watches()
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda seed: ledger.submit(spec(seed), "o", max_queued_nfe=10**9)[0], range(1, 49)))
    assert len(set(ids)) == 48 and redis_conn.llen(Keys.queue(MODEL)) == 49
    assert watches() - before == 48 * per_job  # not one submission had to try again
    assert ledger.queued_nfe() == 49 * spec(0).nfe_total


def test_a_submission_that_waits_too_long_for_its_turn_goes_without_it(redis_conn: redis.Redis,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Turns must not queue every request behind a slow Redis: past the wait, a submission goes ahead."""
    monkeypatch.setattr(service.ledger, "SUBMIT_TURN_WAIT_S", 0.2)
    ledger = book(redis_conn)
    with ledger._submitting:  # another submission, stuck
        started = time.monotonic()
        job_id, created = ledger.submit(spec(1), "o", max_queued_nfe=10**9)
        waited = time.monotonic() - started
    assert created and redis_conn.lpos(Keys.queue(MODEL), job_id) == 0
    assert 0.2 <= waited < 2.0
    assert ledger.submit(spec(2), "o", max_queued_nfe=10**9)[1]  # the turn was not kept


def ledger_jobs(conn: redis.Redis) -> int:
    return len(conn.keys("edm:job:*"))
