"""The gateway's operations on the job ledger (submit, read, wait, cancel, fleet views). No torch.

The key layout and the terminal-state writes that the worker shares are contract/ledger.py.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import WatchError
from rq import Queue
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer

from contract.events import PREVIEW_FIELD
from contract.jobs import JobResult, JobSpec, JobStatus, Progress, WorkerInfo
from contract.ledger import JOB_FUNC, Keys, Outcome, finish, new_job_id, text

STATUS_OF_RQ = {
    RQStatus.QUEUED: JobStatus.queued, RQStatus.CREATED: JobStatus.queued,
    RQStatus.DEFERRED: JobStatus.queued, RQStatus.SCHEDULED: JobStatus.queued,
    RQStatus.STARTED: JobStatus.running,
    RQStatus.FINISHED: JobStatus.succeeded,
    RQStatus.FAILED: JobStatus.failed, RQStatus.STOPPED: JobStatus.failed,
    RQStatus.CANCELED: JobStatus.cancelled,
}


@dataclass(frozen=True)
class JobRecord:
    """Everything GET /v1/jobs/{id} shows."""

    id: str
    status: JobStatus
    spec: JobSpec
    queue_position: int | None
    progress: Progress
    created_at: float
    started_at: float | None
    finished_at: float | None
    reruns: int
    error: str | None
    result: JobResult | None
    cancel_requested: bool = False


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class QueueFull(Exception):
    """Admitting the job would put the queued work above the limit: `queued` NFE are queued now."""

    def __init__(self, queued: int, limit: int):
        super().__init__(f"{queued} NFE queued, limit {limit}")
        self.queued = queued
        self.limit = limit


def _float(value: Any) -> float | None:
    return float(value) if value not in (None, b"", "") else None



# -- the gateway's operations ---------------------------------------------------------------------

# A turn takes a few milliseconds. One that waits longer is behind a slow or absent Redis: it goes
# without its turn (the transaction is still correct, only retried more) rather than queue behind
# every other request's timeout.
SUBMIT_TURN_WAIT_S = 1.0


class Ledger:
    """The gateway's view of the ledger. Every method may raise redis.RedisError."""

    def __init__(self, conn: redis.Redis, *, result_ttl_s: int, failure_ttl_s: int,
                 idempotency_ttl_s: int = 86400):
        self.conn = conn
        self.result_ttl_s = result_ttl_s
        self.failure_ttl_s = failure_ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        # One submission at a time in this process: each adds to edm:queued_nfe, which every concurrent
        # one WATCHes, so in a burst they would undo each other (measured: 4.2 tries per job, 64 at once).
        self._submitting = threading.Lock()
        self._queues: dict[str, Queue] = {}

    def queue(self, model: str) -> Queue:
        if model not in self._queues:
            self._queues[model] = Queue(model, connection=self.conn, serializer=JSONSerializer)
        return self._queues[model]

    def ping(self) -> bool:
        return bool(self.conn.ping())

    # submission

    def submit(self, spec: JobSpec, owner: str, *, idempotency_key: str | None = None,
               body_hash: str = "", preview_every: int = 0, max_queued_nfe: int | None = None) -> tuple[str, bool]:
        """Enqueue a job; returns (job id, created). An Idempotency-Key seen before returns its job.

        One optimistic transaction: the key (if any) and edm:queued_nfe (if `max_queued_nfe` is given)
        are WATCHed and read, then the job is written in MULTI; if either changed meanwhile, the whole
        thing is done again from the reads. So a key never names a job that is still being created (two
        concurrent requests with one key make one job), a key seen before returns its job before the
        limit is looked at, and the queued work after the job is admitted is never above
        `max_queued_nfe` whatever runs concurrently (QueueFull instead; its NFE came from the same read).
        `preview_every` (k > 0: x0 previews with every k-th evaluation) is written in that transaction
        too: a worker may claim the job at once and reads it then. Submissions from this process take
        turns; those of other gateways and the workers' claims may still make one try again."""
        turn = self._submitting.acquire(timeout=SUBMIT_TURN_WAIT_S)
        try:
            return self._submit(spec, owner, idempotency_key, body_hash, preview_every, max_queued_nfe)
        finally:
            if turn:
                self._submitting.release()

    def _submit(self, spec: JobSpec, owner: str, idempotency_key: str | None, body_hash: str, preview_every: int,
                max_queued_nfe: int | None) -> tuple[str, bool]:
        rkey = None if idempotency_key is None else Keys.idempotency(owner, idempotency_key)
        watched = [key for key in (rkey, None if max_queued_nfe is None else Keys.QUEUED_NFE) if key is not None]
        while True:
            with self.conn.pipeline() as pipe:
                try:
                    if watched:
                        pipe.watch(*watched)
                    if rkey is not None:
                        existing = self._job_of_key(pipe, rkey, str(idempotency_key), body_hash)
                        if existing is not None:
                            return existing, False
                    if max_queued_nfe is not None:
                        queued = int(pipe.get(Keys.QUEUED_NFE) or 0)
                        if queued + spec.nfe_total > max_queued_nfe:
                            raise QueueFull(queued, max_queued_nfe)
                    job_id = new_job_id()
                    pipe.multi()
                    self._enqueue(pipe, spec, owner, job_id, preview_every)
                    if rkey is not None:
                        pipe.set(rkey, json.dumps({"job": job_id, "body": body_hash}), ex=self.idempotency_ttl_s)
                    pipe.execute()
                    return job_id, True
                except WatchError:  # a job was queued, claimed or cancelled, or the key taken: read again
                    continue

    def _enqueue(self, pipe: Any, spec: JobSpec, owner: str, job_id: str, preview_every: int = 0) -> None:
        """Queue on `pipe` (a MULTI pipeline) the RQ job, its edm:job hash and its queued NFE."""
        self.queue(spec.model).enqueue_call(
            JOB_FUNC, kwargs={"spec": spec.model_dump(mode="json")}, job_id=job_id,
            result_ttl=self.result_ttl_s, failure_ttl=self.failure_ttl_s, timeout=-1,
            description=f"{spec.model}: {spec.num_images} image(s), {spec.sampler.num_steps} steps",
            pipeline=pipe)
        pipe.hset(Keys.job(job_id), mapping={
            "owner": owner, "model": spec.model, "images": spec.num_images, "nfe": spec.nfe_total,
            "qnfe": spec.nfe_total, "reruns": 0, "cancel": 0, "created": time.time()})
        pipe.incrby(Keys.QUEUED_NFE, spec.nfe_total)
        if preview_every > 0:
            pipe.hset(Keys.job(job_id), PREVIEW_FIELD, preview_every)

    def replay(self, owner: str, idempotency_key: str, body_hash: str) -> str | None:
        """The existing job of an Idempotency-Key (before admission: a replay is never refused as
        over the queue limit), or None; IdempotencyConflict if the key was used with another body."""
        return self._job_of_key(self.conn, Keys.idempotency(owner, idempotency_key), idempotency_key, body_hash)

    def _job_of_key(self, conn: Any, rkey: str, key: str, body_hash: str) -> str | None:
        """The job an Idempotency-Key names, if it still exists (None: unused, or its job expired);
        IdempotencyConflict if the key was used with another body."""
        raw = conn.get(rkey)
        if raw is None:
            return None
        seen = json.loads(raw)
        if seen["body"] != body_hash:
            raise IdempotencyConflict(key)
        return str(seen["job"]) if conn.exists(Keys.job(seen["job"])) else None

    # reading

    def owner_of(self, job_id: str) -> str | None:
        owner = self.conn.hget(Keys.job(job_id), "owner")
        return None if owner is None else text(owner)

    def model_of(self, job_id: str) -> str | None:
        model = self.conn.hget(Keys.job(job_id), "model")
        return None if model is None else text(model)

    def status(self, job_id: str) -> JobStatus | None:
        raw = self.conn.hget(Keys.rq_job(job_id), "status")
        return None if raw is None else STATUS_OF_RQ[RQStatus(text(raw))]

    def record(self, job_id: str) -> JobRecord | None:
        fields = {text(k): text(v) for k, v in self.conn.hgetall(Keys.job(job_id)).items()}
        if not fields:
            return None
        try:
            job = Job.fetch(job_id, connection=self.conn, serializer=JSONSerializer)
        except Exception:  # NoSuchJobError, or a hash that expired between the two reads
            return None
        spec = JobSpec.model_validate(job.kwargs["spec"])
        status = STATUS_OF_RQ[job.get_status(refresh=False)]
        if status.terminal and "finished" not in fields:  # the job ended between the two reads
            fields = {text(k): text(v) for k, v in self.conn.hgetall(Keys.job(job_id)).items()} or fields
        position = None
        if status is JobStatus.queued:
            found = self.conn.lpos(Keys.queue(spec.model), job_id)
            position = found if isinstance(found, int) else 0  # not in the list: a worker just claimed it
        result = None
        if status is JobStatus.succeeded:
            value = job.return_value()
            result = None if value is None else JobResult.model_validate(value)
        progress = Progress(
            step=int(fields.get("step", 0)), num_steps=int(fields.get("num_steps", spec.sampler.num_steps)),
            nfe=int(fields.get("nfe_done", 0)), nfe_total=spec.nfe_total,
            images_done=int(fields.get("images_done", 0)), images_total=spec.num_images)
        return JobRecord(
            id=job_id, status=status, spec=spec, queue_position=position, progress=progress,
            created_at=float(fields["created"]), started_at=_float(fields.get("started")),
            finished_at=_float(fields.get("finished")), reruns=int(fields.get("reruns", 0)),
            error=fields.get("error"), result=result, cancel_requested=fields.get("cancel") == "1")

    def png(self, job_id: str, index: int) -> bytes | None:
        return self.conn.get(Keys.png(job_id, index))  # type: ignore[return-value]

    def pngs(self, job_id: str, count: int) -> list[bytes | None]:
        return self.conn.mget([Keys.png(job_id, k) for k in range(count)])  # type: ignore[return-value]

    # cancellation

    def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel a queued job at once, or flag a running one (the worker stops it next evaluation)."""
        model = self.conn.hget(Keys.job(job_id), "model")
        if model is None:
            return None
        if self._cancel_queued(job_id, Keys.queue(text(model))):
            return JobStatus.cancelled
        status = self.status(job_id)
        if status is not None and not status.terminal:
            self.conn.hset(Keys.job(job_id), "cancel", 1)  # durable: checked when a batch starts
            self.conn.publish(Keys.CANCEL_CHANNEL, job_id)  # prompt: seen at the next evaluation
        return status

    def _cancel_queued(self, job_id: str, queue: str) -> bool:
        """If the job is still in its queue: take it out, stop counting its NFE and write its cancelled
        state, all in one transaction (an error half-way leaves it queued); else False."""
        while True:
            with self.conn.pipeline() as pipe:
                try:
                    pipe.watch(queue, Keys.job(job_id))
                    if pipe.lpos(queue, job_id) is None:
                        return False
                    qnfe = int(pipe.hget(Keys.job(job_id), "qnfe") or 0)
                    pipe.multi()
                    pipe.lrem(queue, 1, job_id)
                    if qnfe > 0:
                        pipe.hset(Keys.job(job_id), "qnfe", 0)
                        pipe.decrby(Keys.QUEUED_NFE, qnfe)
                    finish(self.conn, pipe, [Outcome(job_id, JobStatus.cancelled, error="cancelled while queued")],
                           result_ttl=self.result_ttl_s, failure_ttl=self.failure_ttl_s)
                    pipe.execute()
                    return True
                except WatchError:
                    continue

    # the fleet

    def queued_nfe(self) -> int:
        return int(self.conn.get(Keys.QUEUED_NFE) or 0)

    def queue_lengths(self, models: list[str]) -> dict[str, int]:
        with self.conn.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.llen(Keys.queue(model))
            return dict(zip(models, pipe.execute(), strict=True))

    def live_workers(self) -> list[WorkerInfo]:
        ids = sorted(text(w) for w in self.conn.smembers(Keys.WORKERS))
        if not ids:
            return []
        beats = self.conn.mget([Keys.heartbeat(w) for w in ids])
        return [WorkerInfo.model_validate_json(b) for b in beats if b]

    def loading(self, models: list[str]) -> dict[str, dict[str, Any]]:
        """What workers report about the models they are downloading or loading (contract/ledger.py)."""
        if not models:
            return {}
        values = self.conn.mget([Keys.loading(model) for model in models])
        return {model: json.loads(value) for model, value in zip(models, values, strict=True) if value}

    def published_cards(self) -> dict[str, dict[str, Any]]:
        return {text(k): json.loads(v) for k, v in self.conn.hgetall(Keys.CARDS).items()}
