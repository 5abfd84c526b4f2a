"""The worker's Redis adapter: claim jobs from RQ's queues, report, finish, heartbeat, reap.

Claiming moves an id from `rq:queue:{model}` into this worker's `edm:claimed:{worker}` list
(LMOVE / BLMOVE, Redis 6.2), so a claimed job is always in exactly one list. While the worker
lives it refreshes `edm:hb:{worker}` (TTL a few heartbeats). When a heartbeat expires, the reaper
(any worker, under a short lock) moves the dead worker's ids back to the front of their queues
and counts a rerun; past EDM_MAX_RERUNS the job fails with a reason instead. Under the same lock
it drops expired entries from RQ's finished/failed/canceled registries.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Sequence
from typing import Any

import redis
from redis.exceptions import WatchError
from rq import Queue
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from contract.events import PREVIEW_FIELD, STREAM_MAXLEN, Frame, add_event, events_key
from contract.jobs import ImageInfo, JobSpec, JobStatus, WorkerInfo
from contract.ledger import Keys, Outcome, finish, rq_time, text
from worker.batcher import Claimed

log = logging.getLogger("worker.queue")

# After LMOVE: stop counting a job's NFE as queued (idempotent: qnfe is zeroed once).
_ACCOUNT_LUA = """
local qnfe = tonumber(redis.call('HGET', KEYS[1], 'qnfe') or '0')
if qnfe > 0 then
  redis.call('HSET', KEYS[1], 'qnfe', 0)
  redis.call('DECRBY', KEYS[2], qnfe)
end
"""

# Up to ARGV[1] ids from a queue into a claimed list, with their NFE accounted. Returns the ids.
CLAIM = """
local ids = {}
for i = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  local job = 'edm:job:' .. id
  local qnfe = tonumber(redis.call('HGET', job, 'qnfe') or '0')
  if qnfe > 0 then
    redis.call('HSET', job, 'qnfe', 0)
    redis.call('DECRBY', KEYS[3], qnfe)
  end
  ids[#ids + 1] = id
end
return ids
"""

# Give a claimed id back to the front of its queue, as it was before its run (no progress, start
# time or worker). KEYS: claimed list, queue, started registry, queued-NFE counter. ARGV: id,
# count_rerun (1/0), max_reruns. Returns 1 requeued, 0 not held, -1 over the rerun limit (left in
# the claimed list: the caller fails it).
REQUEUE = """
local id = ARGV[1]
local job = 'edm:job:' .. id
if ARGV[2] == '1' then
  local reruns = tonumber(redis.call('HGET', job, 'reruns') or '0')
  if reruns >= tonumber(ARGV[3]) then return -1 end
end
if redis.call('LREM', KEYS[1], 1, id) == 0 then return 0 end
if redis.call('EXISTS', 'rq:job:' .. id) == 0 then return 0 end
if ARGV[2] == '1' then redis.call('HINCRBY', job, 'reruns', 1) end
redis.call('LPUSH', KEYS[2], id)
redis.call('HSET', 'rq:job:' .. id, 'status', 'queued')
local execution = redis.call('HGET', job, 'execution')
if execution then
  redis.call('ZREM', KEYS[3], execution)
  redis.call('HDEL', job, 'execution')
end
redis.call('HSET', job, 'step', 0, 'nfe_done', 0, 'images_done', 0)
redis.call('HDEL', job, 'started', 'worker')
redis.call('HDEL', 'rq:job:' .. id, 'started_at', 'worker_name')
if tonumber(redis.call('HGET', job, 'qnfe') or '0') == 0 then
  local nfe = tonumber(redis.call('HGET', job, 'nfe') or '0')
  redis.call('HSET', job, 'qnfe', nfe)
  redis.call('INCRBY', KEYS[4], nfe)
end
return 1
"""

def _terminal_event(outcome: Outcome) -> tuple[str, dict[str, Any]]:
    if outcome.status is JobStatus.succeeded and outcome.result is not None:
        return "done", {"images": len(outcome.result.images), "sampling_s": round(outcome.result.sampling_s, 4)}
    return "error", {"status": outcome.status.value, "message": outcome.error or outcome.status.value}


# A progress event on each stream in KEYS (capped near ARGV[1] entries). ARGV then holds, per key: the
# event's data (JSON), the number of frames n, and n (field, PNG) pairs. The stream's expiry is left to
# the started, image and terminal events.
PUBLISH = """
local a = 2
for i = 1, #KEYS do
  local entry = {'XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], '*', 'type', 'progress', 'data', ARGV[a]}
  local n = tonumber(ARGV[a + 1])
  for j = 1, 2 * n do entry[10 + j] = ARGV[a + 1 + j] end
  a = a + 2 + 2 * n
  redis.call(unpack(entry))
end
"""

# Delete a key only if it still holds our token (releasing a lock we own).
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class WorkerQueue:
    """Every Redis call the worker makes. Methods raise redis.RedisError when Redis is away."""

    def __init__(self, conn: redis.Redis, worker_id: str, *, result_ttl_s: int, failure_ttl_s: int,
                 heartbeat_ttl_s: float, max_reruns: int):
        self.conn = conn
        self.id = worker_id
        self.claimed_key = Keys.claimed(worker_id)
        self.result_ttl_s = result_ttl_s
        self.failure_ttl_s = failure_ttl_s
        self.heartbeat_ttl_ms = int(heartbeat_ttl_s * 1000)
        self.max_reruns = max_reruns
        self._claim = conn.register_script(CLAIM)
        self._requeue = conn.register_script(REQUEUE)
        self._release = conn.register_script(RELEASE)
        self._account = conn.register_script(_ACCOUNT_LUA)
        self._publish = conn.register_script(PUBLISH)

    # claiming

    def claim(self, model: str, n: int) -> list[Claimed]:
        """Up to n queued jobs of `model`, without waiting."""
        ids = self._claim(keys=[Keys.queue(model), self.claimed_key, Keys.QUEUED_NFE], args=[n])
        return self._load([text(i) for i in ids])

    def claim_blocking(self, model: str, timeout_s: float) -> list[Claimed]:
        """One job of `model`, waiting up to timeout_s for it (BLMOVE)."""
        raw = self.conn.blmove(Keys.queue(model), self.claimed_key, timeout_s, "LEFT", "RIGHT")  # type: ignore[arg-type]
        if raw is None:
            return []
        job_id = text(raw)
        self._account(keys=[Keys.job(job_id), Keys.QUEUED_NFE])
        return self._load([job_id])

    def _load(self, ids: list[str]) -> list[Claimed]:
        if not ids:
            return []
        jobs = Job.fetch_many(ids, connection=self.conn, serializer=JSONSerializer)
        with self.conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(Keys.job(job_id), "created")
            created = pipe.execute()
        out, unreadable = [], []
        for job_id, job, created_at in zip(ids, jobs, created, strict=True):
            if job is None or created_at is None:  # expired or deleted under us: drop the id
                self.conn.lrem(self.claimed_key, 1, job_id)
                continue
            try:
                spec = JobSpec.model_validate(job.kwargs["spec"])
            except Exception as error:  # e.g. a field from a newer gateway during a rolling upgrade
                reason = "this worker cannot read the job: " + " ".join(str(error).split())
                log.warning("claimed a job it cannot read", extra={"job_id": job_id, "reason": reason})
                unreadable.append(Outcome(job_id, JobStatus.failed, error=reason[:1000]))
                continue
            out.append(Claimed(job_id, spec, float(created_at)))
        if unreadable:
            self.finish(unreadable)
        return out

    def unclaim(self, jobs: list[Claimed]) -> None:
        """Give jobs back to the front of their queues, in their order (no rerun counted)."""
        for job in reversed(jobs):
            self._requeue_one(self.claimed_key, job.id, job.spec.model, count_rerun=False)

    def model_of(self, job_id: str) -> str | None:
        model = self.conn.hget(Keys.job(job_id), "model")
        return None if model is None else text(model)

    def held(self) -> list[str]:
        return [text(i) for i in self.conn.lrange(self.claimed_key, 0, -1)]

    def _requeue_one(self, claimed_key: str, job_id: str, model: str, *, count_rerun: bool) -> int:
        registry = StartedJobRegistry(model, connection=self.conn).key
        return int(self._requeue(keys=[claimed_key, Keys.queue(model), registry, Keys.QUEUED_NFE],
                                 args=[job_id, int(count_rerun), self.max_reruns]))

    # running

    def mark_started(self, job: Claimed) -> None:
        self.mark_started_many([job])

    def mark_started_many(self, jobs: Sequence[Claimed]) -> None:
        """Jobs whose first image entered the sampler: running, in RQ's started registry, a started event."""
        now = time.time()
        with self.conn.pipeline() as pipe:
            for job in jobs:
                execution = f"{job.id}:{self.id}"
                registry = StartedJobRegistry(job.spec.model, connection=self.conn).key
                pipe.hset(Keys.rq_job(job.id), mapping={"status": RQStatus.STARTED.value, "worker_name": self.id,
                                                        "started_at": rq_time(now)})
                pipe.zadd(registry, {execution: "+inf"})  # never "expires": our reaper handles dead workers
                pipe.hset(Keys.job(job.id), mapping={"started": now, "worker": self.id, "execution": execution})
                add_event(pipe, job.id, "started", {"started_at": now, "worker": self.id}, ttl_s=self.result_ttl_s)
            pipe.execute()

    def report(self, progress: dict[str, dict[Any, Any]]) -> set[str]:
        """Write each job's progress fields; return the ids whose cancellation was requested."""
        ids = list(progress)
        with self.conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hset(Keys.job(job_id), mapping=progress[job_id])
                pipe.hget(Keys.job(job_id), "cancel")
            replies = pipe.execute()
        return {job_id for job_id, flag in zip(ids, replies[1::2], strict=True) if flag == b"1"}

    def cancel_requested(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        with self.conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(Keys.job(job_id), "cancel")
            flags = pipe.execute()
        return {job_id for job_id, flag in zip(ids, flags, strict=True) if flag == b"1"}

    def store_pngs(self, pngs: list[tuple[str, int, bytes]], images: Sequence[tuple[str, ImageInfo]] = ()) -> None:
        """(job id, image index, PNG bytes) triples, then an image event per (job id, info), in one round trip."""
        with self.conn.pipeline(transaction=False) as pipe:
            for job_id, index, data in pngs:
                pipe.set(Keys.png(job_id, index), data, ex=self.result_ttl_s)
            for job_id, info in images:
                add_event(pipe, job_id, "image", info.model_dump(mode="json"), ttl_s=self.result_ttl_s)
            pipe.execute()

    def store_images(self, stores: Sequence[tuple[str, Sequence[tuple[ImageInfo, bytes]]]]) -> None:
        """Finished images of jobs, (job id, [(info, PNG)]), each kept at once (PNG, its info for a rerun,
        an image event), in one transaction: a rerun after a worker death recomputes only the images
        not stored yet."""
        with self.conn.pipeline() as pipe:
            for job_id, images in stores:
                for info, data in images:
                    pipe.set(Keys.png(job_id, info.index), data, ex=self.result_ttl_s)
                    pipe.hset(Keys.images(job_id), str(info.index), info.model_dump_json())
                    add_event(pipe, job_id, "image", info.model_dump(mode="json"), ttl_s=self.result_ttl_s)
                pipe.expire(Keys.images(job_id), self.result_ttl_s)
            pipe.execute()

    def stored_images(self, ids: list[str]) -> dict[str, dict[int, ImageInfo]]:
        """For each job, the images an earlier run stored (and whose PNG is still there), by index."""
        with self.conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(Keys.images(job_id))
            replies = pipe.execute()
        infos = {job_id: {int(text(k)): ImageInfo.model_validate_json(v) for k, v in reply.items()}
                 for job_id, reply in zip(ids, replies, strict=True)}
        checks = [(job_id, index) for job_id in ids for index in sorted(infos[job_id])]
        if not checks:
            return infos
        with self.conn.pipeline(transaction=False) as pipe:
            for job_id, index in checks:
                pipe.exists(Keys.png(job_id, index))
            present = pipe.execute()
        for (job_id, index), there in zip(checks, present, strict=True):
            if not there:
                del infos[job_id][index]
        return infos

    def publish_progress(self, events: list[tuple[str, dict[str, Any], list[Frame]]]) -> None:
        """Append (job id, data, frames) progress events to the jobs' event streams: one script call per
        network evaluation, whatever the batch holds (a pipeline of XADDs takes twice as long)."""
        args: list[Any] = [STREAM_MAXLEN]
        for _, data, frames in events:
            args += [json.dumps(data, separators=(",", ":")), len(frames)]
            args += [item for frame in frames for item in (f"f:{frame.index}", frame.png)]
        self._publish(keys=[events_key(job_id) for job_id, _, _ in events], args=args)

    def preview_every(self, ids: list[str]) -> dict[str, int]:
        """Job id -> k for the jobs that asked for x0 previews with every k-th evaluation."""
        with self.conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(Keys.job(job_id), PREVIEW_FIELD)
            values = pipe.execute()
        return {job_id: int(value) for job_id, value in zip(ids, values, strict=True) if value and int(value) > 0}

    # terminal states

    def finish(self, outcomes: list[Outcome], claimed_key: str | None = None) -> set[str]:
        """Write the terminal states of the jobs that `claimed_key` (default: ours) still holds, in one
        transaction; returns their ids. A job missing from the list was given to another worker by the
        reaper: nothing is written for it."""
        claimed_key = claimed_key or self.claimed_key
        while True:
            with self.conn.pipeline() as pipe:
                try:
                    pipe.watch(claimed_key)
                    held = {text(raw) for raw in pipe.lrange(claimed_key, 0, -1)}
                    mine = [o for o in outcomes if o.job_id in held]
                    if not mine:
                        return set()
                    pipe.multi()
                    finish(self.conn, pipe, mine, result_ttl=self.result_ttl_s, failure_ttl=self.failure_ttl_s,
                           worker=self.id)
                    for outcome in mine:
                        pipe.lrem(claimed_key, 1, outcome.job_id)
                        add_event(pipe, outcome.job_id, *_terminal_event(outcome), ttl_s=self.result_ttl_s)
                    pipe.execute()
                    return {o.job_id for o in mine}
                except WatchError:
                    continue

    # liveness

    def heartbeat(self, info: WorkerInfo) -> None:
        with self.conn.pipeline(transaction=False) as pipe:
            pipe.set(Keys.heartbeat(self.id), info.model_dump_json(), px=self.heartbeat_ttl_ms)
            pipe.sadd(Keys.WORKERS, self.id)
            pipe.execute()

    def report_loading(self, model: str, state: dict[str, Any], ttl_s: float = 30.0) -> None:
        """Tell readiness that this worker is downloading or loading `model` (best-effort: the gateway
        only shows it). The key expires unless refreshed, so a worker that dies loading leaves nothing."""
        value = json.dumps({**state, "worker": self.id, "updated_at": time.time()}, separators=(",", ":"))
        try:
            self.conn.set(Keys.loading(model), value, px=int(ttl_s * 1000))
        except redis.RedisError as error:
            log.warning("could not report loading progress: %s", error)

    def loaded(self, model: str) -> None:
        try:
            self.conn.delete(Keys.loading(model))
        except redis.RedisError as error:
            log.warning("could not clear the loading report: %s", error)

    def stop_heartbeat(self) -> None:
        """Let the fleet see this worker as dead now (its reaper-run jobs go to other workers)."""
        self.conn.delete(Keys.heartbeat(self.id))

    def publish_card(self, name: str, card_json: str) -> None:
        self.conn.hset(Keys.CARDS, name, card_json)

    def give_back_all(self, exclude: Collection[str] = (), *, count_rerun: bool = False,
                      failure: str = "") -> list[tuple[str, str]]:
        """Give every id in our claimed list but `exclude` back to the front of its queue, in claim
        order: also ids this process never learnt it held (a claim whose reply was lost and whose retry
        claimed again, a load that raised after the move). With count_rerun, a job past EDM_MAX_RERUNS
        fails with `failure` as its reason. Returns (job id, 'requeued' or 'failed') pairs."""
        return self._requeue_list(self.claimed_key, count_rerun=count_rerun, exclude=exclude, failure=failure)

    def retire(self) -> None:
        """Leave the fleet after a clean shutdown. Whatever the claimed list still holds goes back
        to its queue first, so that no claimed job is ever deleted with the list."""
        self.give_back_all()
        with self.conn.pipeline() as pipe:
            pipe.delete(Keys.heartbeat(self.id))
            pipe.srem(Keys.WORKERS, self.id)
            pipe.delete(self.claimed_key)
            pipe.execute()

    def reap(self) -> list[tuple[str, str]]:
        """Requeue the jobs of workers whose heartbeat expired. Returns (job id, outcome) pairs,
        outcome 'requeued' or 'failed'. Runs under a lock so one reaper acts at a time."""
        token = f"{self.id}:{time.time()}"
        if not self.conn.set(Keys.REAPER_LOCK, token, nx=True, px=self.heartbeat_ttl_ms):
            return []
        outcomes: list[tuple[str, str]] = []
        try:
            for raw in self.conn.smembers(Keys.WORKERS):
                worker = text(raw)
                if worker == self.id or self.conn.exists(Keys.heartbeat(worker)):
                    continue
                outcomes += self._reap_worker(worker)
            self._trim_registries()
        finally:
            self._release(keys=[Keys.REAPER_LOCK], args=[token])
        return outcomes

    def _trim_registries(self) -> None:
        """Drop expired entries from RQ's finished, failed and canceled registries of every queue (RQ's
        own workers clean them; ours must, or they grow forever). Entries are scored by expiry time."""
        now = time.time()
        queues = [text(raw).removeprefix(Queue.redis_queue_namespace_prefix)
                  for raw in self.conn.smembers(Queue.redis_queues_keys)]
        with self.conn.pipeline(transaction=False) as pipe:
            for name in queues:
                for registry in (FinishedJobRegistry, FailedJobRegistry, CanceledJobRegistry):
                    pipe.zremrangebyscore(registry.key_template.format(name), 0, now)
            pipe.execute()

    def _reap_worker(self, worker: str) -> list[tuple[str, str]]:
        claimed_key = Keys.claimed(worker)
        reason = f"its worker died {self.max_reruns + 1} times while running it (EDM_MAX_RERUNS)"
        outcomes = self._requeue_list(claimed_key, count_rerun=True, failure=reason)
        for job_id, _ in outcomes:
            log.warning("reaped job of dead worker %s", worker, extra={"job_id": job_id, "dead_worker": worker})
        if not self.conn.llen(claimed_key):
            self.conn.srem(Keys.WORKERS, worker)
        return outcomes

    def _requeue_list(self, claimed_key: str, *, count_rerun: bool, exclude: Collection[str] = (),
                      failure: str = "") -> list[tuple[str, str]]:
        """Requeue the ids of a claimed list (but `exclude`), last first so that they keep their order
        at the front of their queues. Returns (job id, 'requeued' or 'failed') pairs: with count_rerun,
        a job past EDM_MAX_RERUNS fails with `failure` as its reason. Ids whose job is gone are dropped."""
        outcomes = []
        for raw in reversed(self.conn.lrange(claimed_key, 0, -1)):
            job_id = text(raw)
            if job_id in exclude:
                continue
            model = self.conn.hget(Keys.job(job_id), "model")
            if model is None:
                self.conn.lrem(claimed_key, 1, job_id)
                continue
            code = self._requeue_one(claimed_key, job_id, text(model), count_rerun=count_rerun)
            if code == 1:
                outcomes.append((job_id, "requeued"))
            elif code == -1:
                self.finish([Outcome(job_id, JobStatus.failed, error=failure)], claimed_key=claimed_key)
                outcomes.append((job_id, "failed"))
        return outcomes
