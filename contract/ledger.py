"""The job ledger's layout in Redis and the writes both sides make: RQ jobs on one queue per model,
plus a few edm:* keys. No torch.

RQ holds each job (spec as JSON kwargs, status, result) so that `rq info` shows the queues, but
RQ's own worker never runs them: our worker claims ids from RQ's queue lists itself (see
worker/queue.py). Beside RQ's keys, per job:

    edm:job:{id}      hash: owner, model, images, nfe, qnfe (NFE still counted as queued),
                      reruns, cancel, created/started/finished, progress fields, error, execution,
                      claim + holder (fencing, below), event_bytes (contract/events.py)
    edm:png:{id}:{k}  PNG bytes of image k
    edm:images:{id}   hash: k -> ImageInfo JSON of each image stored so far (a rerun skips them)

and globally: edm:queued_nfe (NFE of queued jobs),
edm:workers + edm:hb:{worker} (heartbeats), edm:claimed:{worker} (ids a worker holds),
edm:cards (model cards published by workers), edm:idem:{owner}:{key} (Idempotency-Key),
edm:loading:{model} (JSON: a worker downloading or loading that model, its progress; expires).

Fencing: `claim` is a counter that goes up by one whenever a job is claimed, given back to its
queue (by its worker or by the reaper) or ends; a claim also sets `holder` (the worker id). A
worker keeps the value its claim set, and every write it makes for the job (started mark,
progress, events, PNGs, terminal state) is a script or transaction that checks that value in
Redis first: a worker whose job was given to another (its heartbeat expired during a long pause
or a partition) writes nothing more for it, and learns so from the refusal.

This module holds the key layout and the terminal-state writes both sides use; the gateway's
operations live in service/ledger.py, the worker's claim / heartbeat / reaper in worker/queue.py.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from contract.jobs import JobResult, JobStatus

JOB_FUNC = "worker.tasks.generate"  # what `rq info` shows; our worker runs it, never RQ's
CLAIM = "claim"    # edm:job:{id} field: the claim generation (fencing token), see above
HOLDER = "holder"  # edm:job:{id} field: the worker whose claim it is


class Keys:
    """The Redis key layout (RQ's own keys come from RQ)."""

    WORKERS = "edm:workers"
    CARDS = "edm:cards"
    QUEUED_NFE = "edm:queued_nfe"
    REAPER_LOCK = "edm:lock:reaper"
    CANCEL_CHANNEL = "edm:cancel"  # pub/sub: job ids whose cancellation was just requested

    @staticmethod
    def job(job_id: str) -> str:
        return f"edm:job:{job_id}"

    @staticmethod
    def png(job_id: str, index: int) -> str:
        return f"edm:png:{job_id}:{index}"

    @staticmethod
    def images(job_id: str) -> str:
        return f"edm:images:{job_id}"

    @staticmethod
    def claimed(worker_id: str) -> str:
        return f"edm:claimed:{worker_id}"

    @staticmethod
    def loading(model: str) -> str:
        return f"edm:loading:{model}"

    @staticmethod
    def heartbeat(worker_id: str) -> str:
        return f"edm:hb:{worker_id}"

    @staticmethod
    def idempotency(owner: str, key: str) -> str:
        return f"edm:idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"

    @staticmethod
    def queue(model: str) -> str:
        return Queue.redis_queue_namespace_prefix + model

    @staticmethod
    def rq_job(job_id: str) -> str:
        return Job.redis_job_namespace_prefix + job_id


def text(value: Any) -> str:
    """A Redis reply as str (replies are bytes: clients are made without decode_responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A client that fails fast: short timeouts, one immediate retry (which reconnects)."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 1.0),
                                retry=Retry(NoBackoff(), 1))


def new_job_id() -> str:
    return secrets.token_urlsafe(18)  # 144 random bits; no ':' (RQ splits execution ids on it)



@dataclass(frozen=True)
class Outcome:
    """How a job ends: succeeded (with its result), failed (with a reason) or cancelled."""

    job_id: str
    status: JobStatus
    result: JobResult | None = None
    error: str | None = None


def finish(conn: redis.Redis, pipe: Any, outcomes: list[Outcome], *, result_ttl: int, failure_ttl: int,
           worker: str = "") -> None:
    """Queue on `pipe` (a MULTI pipeline) the writes that put jobs in their terminal states."""
    ids = [o.job_id for o in outcomes]
    jobs = Job.fetch_many(ids, connection=conn, serializer=JSONSerializer)  # None where RQ's record is gone
    with conn.pipeline(transaction=False) as reads:
        for job_id in ids:
            reads.hget(Keys.job(job_id), "execution")
        executions = reads.execute()
    now = time.time()
    for outcome, job, execution in zip(outcomes, jobs, executions, strict=True):
        ttl = result_ttl if outcome.status is JobStatus.succeeded else failure_ttl
        fields: dict[str, Any] = {"finished": now}
        if outcome.status is not JobStatus.succeeded:
            fields["error"] = outcome.error or outcome.status.value
        if job is not None:
            if execution:
                pipe.zrem(StartedJobRegistry(job.origin, connection=conn).key, execution)
            _finish_rq_job(pipe, job, outcome, now, ttl, fields.get("error", ""), worker)
        job_id = outcome.job_id
        pipe.hset(Keys.job(job_id), mapping=fields)
        pipe.hincrby(Keys.job(job_id), CLAIM, 1)  # ended: no claim holds it any more
        pipe.hdel(Keys.job(job_id), HOLDER)
        for key in (Keys.job(job_id), Keys.rq_job(job_id), Keys.images(job_id)):
            pipe.expire(key, ttl)


def _finish_rq_job(pipe: Any, job: Job, outcome: Outcome, now: float, ttl: int, error: str, worker: str) -> None:
    """RQ's side of a terminal state: status, result stream, registries (what `rq info` counts)."""
    job.ended_at = datetime.fromtimestamp(now, UTC)
    if outcome.status is JobStatus.succeeded:
        assert outcome.result is not None
        job.set_status(RQStatus.FINISHED, pipeline=pipe)
        job.save(pipeline=pipe, include_meta=False)
        Result.create(job, Result.Type.SUCCESSFUL, ttl, return_value=outcome.result.model_dump(mode="json"),
                      worker_name=worker, pipeline=pipe)
        FinishedJobRegistry(job.origin, connection=job.connection).add(job, ttl, pipeline=pipe)
    elif outcome.status is JobStatus.failed:
        job.set_status(RQStatus.FAILED, pipeline=pipe)
        Result.create_failure(job, ttl, exc_string=error, worker_name=worker, pipeline=pipe)
        FailedJobRegistry(job.origin, connection=job.connection).add(job, ttl=ttl, exc_string=error, pipeline=pipe)
    else:
        job.set_status(RQStatus.CANCELED, pipeline=pipe)
        job.save(pipeline=pipe, include_meta=False)
        # scored by expiry like the other two (RQ's default, ttl 0, scores it as expired at once)
        CanceledJobRegistry(job.origin, connection=job.connection).add(job, ttl, pipeline=pipe)


def rq_time(ts: float) -> str:
    """A timestamp as RQ writes it in its job hashes."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"
