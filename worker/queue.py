"""The worker's Redis adapter: claim jobs from RQ's queues, report, finish, heartbeat, reap.

Claiming moves an id from `rq:queue:{model}` into this worker's `edm:claimed:{worker}` list
(LMOVE / BLMOVE, Redis 6.2), so a claimed job is always in exactly one list. While the worker
lives it refreshes `edm:hb:{worker}` (TTL a few heartbeats). When a heartbeat expires, the reaper
(any worker, under a short lock) moves the dead worker's ids back to the front of their queues
and counts a rerun; past EDM_MAX_RERUNS the job fails with a reason instead. Under the same lock
it drops expired entries from RQ's finished/failed/canceled registries.

Fencing (contract/ledger.py): a claim bumps the job's `claim` generation and this worker keeps the
value (`claims`); giving a job back or ending it bumps it again. Every write for a job — started
mark, progress fields, progress events, PNGs with their image events, terminal state — is one Lua
script (or, for the terminal state, a WATCHed transaction) that checks the generation first, so
the writes of a worker whose job was given to another are refused in Redis. Refused ids are
collected (`take_lost`): the scheduler drops those jobs without failing them. Each script serves
all the jobs of one write, so fencing adds no round trip.

Event streams are bounded in bytes (contract/events.py): the scripts count what they append in
the job's `event_bytes` and drop x0 previews, then progress events, near the bound.
"""

from __future__ import annotations

import json
import logging
import threading
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

from contract.events import EVENT_STREAM_BYTES, PREVIEW_FIELD, Frame, add_event, events_key, stream_limits
from contract.jobs import ImageInfo, JobSpec, JobStatus, WorkerInfo
from contract.ledger import CLAIM, Keys, Outcome, finish, rq_time, text
from worker.batcher import Claimed

log = logging.getLogger("worker.queue")

# A claimed job (its hash KEYS[1]) stops counting as queued NFE (idempotent: qnfe is zeroed once)
# and gets a new claim generation, held by ARGV[1]. Returns the generation (0: the job is gone).
_TAKE = """
local function take(job, queued_nfe, worker)
  if redis.call('EXISTS', job) == 0 then return 0 end
  local qnfe = tonumber(redis.call('HGET', job, 'qnfe') or '0')
  if qnfe > 0 then
    redis.call('HSET', job, 'qnfe', 0)
    redis.call('DECRBY', queued_nfe, qnfe)
  end
  redis.call('HSET', job, 'holder', worker)
  return redis.call('HINCRBY', job, 'claim', 1)
end
"""

# After BLMOVE: take the job (KEYS[1]; KEYS[2] queued NFE) if it is still in our claimed list
# (KEYS[3]; ARGV[1] id, ARGV[2] worker). Returns its claim generation, or false when it is not ours.
ACCOUNT = _TAKE + """
if not redis.call('LPOS', KEYS[3], ARGV[1]) then return false end
return take(KEYS[1], KEYS[2], ARGV[2])
"""

# Up to ARGV[1] ids from a queue into a claimed list, taken for worker ARGV[2]. Returns id, claim
# generation, id, claim generation, ...
CLAIM_JOBS = _TAKE + """
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  out[#out + 1] = id
  out[#out + 1] = take('edm:job:' .. id, KEYS[3], ARGV[2])
end
return out
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
redis.call('HINCRBY', job, 'claim', 1)
redis.call('LPUSH', KEYS[2], id)
redis.call('HSET', 'rq:job:' .. id, 'status', 'queued')
local execution = redis.call('HGET', job, 'execution')
if execution then
  redis.call('ZREM', KEYS[3], execution)
  redis.call('HDEL', job, 'execution')
end
redis.call('HSET', job, 'step', 0, 'nfe_done', 0, 'images_done', 0)
redis.call('HDEL', job, 'started', 'worker', 'holder')
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


# The scripts below write for jobs this worker holds: each job's writes happen only if its hash still
# has the claim generation the worker passes (fencing); they return the (1-based) positions of the
# jobs whose claim has moved on. `append` adds an event to a job's stream and counts its bytes.
_EVENTS = """
local function size_of(fields)
  local n = 0
  for i = 1, #fields do n = n + #fields[i] end
  return n
end
local function append(job, stream, fields)
  redis.call('XADD', stream, '*', unpack(fields))
  redis.call('HINCRBY', job, 'event_bytes', size_of(fields))
end
"""

# Started marks. ARGV: now, RQ's started_at, worker id, TTL, RQ's started status; then per job:
# claim, execution id, the started event's data. KEYS per job: RQ's job hash, RQ's started registry,
# edm:job, edm:events.
STARTED = _EVENTS + """
local now, started_at, worker, ttl, status = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local lost = {}
for i = 1, #KEYS / 4 do
  local rq_job, registry, job, stream = KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1], KEYS[4 * i]
  local claim, execution, data = ARGV[3 * i + 3], ARGV[3 * i + 4], ARGV[3 * i + 5]
  if redis.call('HGET', job, 'claim') ~= claim then
    lost[#lost + 1] = i
  else
    redis.call('HSET', rq_job, 'status', status, 'worker_name', worker, 'started_at', started_at)
    redis.call('ZADD', registry, '+inf', execution)  -- never "expires": our reaper handles dead workers
    redis.call('HSET', job, 'started', now, 'worker', worker, 'execution', execution)
    append(job, stream, {'type', 'started', 'data', data, 'claim', claim})
    redis.call('EXPIRE', stream, ttl)
  end
end
return lost
"""

# Progress fields. KEYS: edm:job hashes. ARGV per job: claim, n, n (field, value) pairs. Returns two
# numbers per job: -1 (not held: nothing written) / 1 (cancellation requested) / 0, and preview_every.
REPORT = """
local out, a = {}, 1
for i = 1, #KEYS do
  local claim, n = ARGV[a], tonumber(ARGV[a + 1])
  local held = redis.call('HMGET', KEYS[i], 'claim', 'cancel', 'preview_every')
  if held[1] ~= claim then
    out[2 * i - 1], out[2 * i] = -1, 0
  else
    if n > 0 then redis.call('HSET', KEYS[i], unpack(ARGV, a + 2, a + 1 + 2 * n)) end
    out[2 * i - 1] = (held[2] == '1') and 1 or 0
    out[2 * i] = tonumber(held[3] or '0') or 0
  end
  a = a + 2 + 2 * n
end
return out
"""

# Finished images: PNG, its info (for a rerun) and an image event each. ARGV: TTL, then per job:
# claim, n, then per image: index, PNG, info JSON ('' = no info: the PNG alone). KEYS per job:
# edm:job, edm:images, edm:events, then its n PNG keys.
STORE = _EVENTS + """
local ttl = ARGV[1]
local lost = {}
local k, a, i = 1, 2, 0
while k <= #KEYS do
  i = i + 1
  local job, images, stream = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local claim, n = ARGV[a], tonumber(ARGV[a + 1])
  local held = redis.call('HGET', job, 'claim') == claim
  if not held then lost[#lost + 1] = i end
  for j = 1, n do
    local png, index, data, info = KEYS[k + 2 + j], ARGV[a + 3 * j - 1], ARGV[a + 3 * j], ARGV[a + 3 * j + 1]
    if held then
      redis.call('SET', png, data, 'EX', ttl)
      if info ~= '' then
        redis.call('HSET', images, index, info)
        append(job, stream, {'type', 'image', 'data', info, 'claim', claim})
      end
    end
  end
  if held and n > 0 then
    redis.call('EXPIRE', images, ttl)
    redis.call('EXPIRE', stream, ttl)
  end
  k, a = k + 3 + n, a + 2 + 3 * n
end
return lost
"""

# Progress events, one per job. ARGV: the previews limit and the progress limit of a stream (bytes,
# contract/events.py), then per job: claim, the event's data (JSON), the number of frames n, and n
# (field, PNG) pairs. KEYS per job: edm:job, edm:events. The frames go only if the stream stays within
# the previews limit, the event only if it stays within the progress limit. Returns the positions of
# the jobs not held and of those whose frames did not fit. The stream's expiry is left to the started,
# image and terminal events.
PUBLISH = _EVENTS + """
local previews, progress = tonumber(ARGV[1]), tonumber(ARGV[2])
local lost, spent = {}, {}
local a = 3
for i = 1, #KEYS / 2 do
  local job, stream = KEYS[2 * i - 1], KEYS[2 * i]
  local claim, data, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local first, last = a + 3, a + 2 + 2 * n
  a = last + 1
  local held = redis.call('HMGET', job, 'claim', 'event_bytes')
  if held[1] ~= claim then
    lost[#lost + 1] = i
  else
    local used = tonumber(held[2] or '0')
    local entry = {'type', 'progress', 'data', data, 'claim', claim}
    local size = size_of(entry)
    if n > 0 then
      local frames = 0
      for j = first, last do frames = frames + #ARGV[j] end
      if used + size + frames <= previews then
        for j = first, last do entry[#entry + 1] = ARGV[j] end
        size = size + frames
      else
        spent[#spent + 1] = i
      end
    end
    if used + size <= progress then
      redis.call('XADD', stream, '*', unpack(entry))
      redis.call('HINCRBY', job, 'event_bytes', size)
    end
  end
end
return {lost, spent}
"""

# Delete a key only if it still holds our token (releasing a lock we own).
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class WorkerQueue:
    """Every Redis call the worker makes. Methods raise redis.RedisError when Redis is away."""

    def __init__(self, conn: redis.Redis, worker_id: str, *, result_ttl_s: int, failure_ttl_s: int,
                 heartbeat_ttl_s: float, max_reruns: int, event_stream_bytes: int = EVENT_STREAM_BYTES):
        self.conn = conn
        self.id = worker_id
        self.claimed_key = Keys.claimed(worker_id)
        self.result_ttl_s = result_ttl_s
        self.failure_ttl_s = failure_ttl_s
        self.heartbeat_ttl_ms = int(heartbeat_ttl_s * 1000)
        self.max_reruns = max_reruns
        self.preview_limit, self.progress_limit = stream_limits(event_stream_bytes)
        self.claims: dict[str, int] = {}  # job id -> the claim generation this worker holds it with
        self.spent: set[str] = set()      # jobs whose x0 previews no longer fit in their event stream
        self._lost: set[str] = set()      # jobs whose writes were refused: their claim moved on
        self._lost_lock = threading.Lock()
        self._claim = conn.register_script(CLAIM_JOBS)
        self._requeue = conn.register_script(REQUEUE)
        self._release = conn.register_script(RELEASE)
        self._account = conn.register_script(ACCOUNT)
        self._started = conn.register_script(STARTED)
        self._report = conn.register_script(REPORT)
        self._store = conn.register_script(STORE)
        self._publish = conn.register_script(PUBLISH)

    # claiming

    def claim(self, model: str, n: int) -> list[Claimed]:
        """Up to n queued jobs of `model`, without waiting."""
        reply = self._claim(keys=[Keys.queue(model), self.claimed_key, Keys.QUEUED_NFE], args=[n, self.id])
        return self._load([(text(reply[k]), int(reply[k + 1])) for k in range(0, len(reply), 2)])

    def claim_blocking(self, model: str, timeout_s: float) -> list[Claimed]:
        """One job of `model`, waiting up to timeout_s for it (BLMOVE)."""
        raw = self.conn.blmove(Keys.queue(model), self.claimed_key, timeout_s, "LEFT", "RIGHT")  # type: ignore[arg-type]
        if raw is None:
            return []
        job_id = text(raw)
        claim = self._account(keys=[Keys.job(job_id), Keys.QUEUED_NFE, self.claimed_key], args=[job_id, self.id])
        if claim is None:  # the reaper gave it back between the two calls: not ours
            return []
        return self._load([(job_id, int(claim))])

    def _load(self, claimed: list[tuple[str, int]]) -> list[Claimed]:
        """The claimed jobs, read in one round trip: RQ's record (the spec), when each was queued, its
        preview setting and the images an earlier run stored."""
        if not claimed:
            return []
        ids = [job_id for job_id, _ in claimed]
        self.claims.update(claimed)
        with self._lost_lock:
            self._lost -= set(ids)
        with self.conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(Keys.rq_job(job_id))
                pipe.hmget(Keys.job(job_id), "created", PREVIEW_FIELD)
                pipe.hgetall(Keys.images(job_id))
            replies = pipe.execute()
        stored = self._still_stored({job_id: replies[3 * k + 2] for k, job_id in enumerate(ids)})
        out, unreadable = [], []
        for k, job_id in enumerate(ids):
            record, (created_at, previews) = replies[3 * k], replies[3 * k + 1]
            if not record or created_at is None:  # expired or deleted under us: drop the id
                self.conn.lrem(self.claimed_key, 1, job_id)
                self._forget([job_id])
                continue
            try:
                job = Job(job_id, connection=self.conn, serializer=JSONSerializer)
                job.restore(record)
                spec = JobSpec.model_validate(job.kwargs["spec"])
            except Exception as error:  # e.g. a field from a newer gateway during a rolling upgrade
                reason = "this worker cannot read the job: " + " ".join(str(error).split())
                log.warning("claimed a job it cannot read", extra={"job_id": job_id, "reason": reason})
                unreadable.append(Outcome(job_id, JobStatus.failed, error=reason[:1000]))
                continue
            out.append(Claimed(job_id, spec, float(created_at), preview_every=max(0, int(previews or 0)),
                               stored=stored[job_id]))
        if unreadable:
            self.finish(unreadable)
        return out

    def _still_stored(self, replies: dict[str, dict[bytes, bytes]]) -> dict[str, dict[int, ImageInfo]]:
        """Job id -> the images an earlier run stored whose PNG is still there, by index."""
        infos = {job_id: {int(text(k)): ImageInfo.model_validate_json(v) for k, v in reply.items()}
                 for job_id, reply in replies.items()}
        checks = [(job_id, index) for job_id, images in infos.items() for index in sorted(images)]
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
        code = int(self._requeue(keys=[claimed_key, Keys.queue(model), registry, Keys.QUEUED_NFE],
                                 args=[job_id, int(count_rerun), self.max_reruns]))
        if code == 1 and claimed_key == self.claimed_key:
            self._forget([job_id])
        return code

    # fencing

    def _token(self, job_id: str) -> str:
        """The claim generation a write for `job_id` must find ('' when this worker holds none: refused)."""
        claim = self.claims.get(job_id)
        return "" if claim is None else str(claim)

    def _forget(self, ids: Collection[str]) -> None:
        for job_id in ids:
            self.claims.pop(job_id, None)
            self.spent.discard(job_id)

    def _refused(self, ids: Collection[str], write: str) -> None:
        """Writes for `ids` were refused: their claim moved on (the reaper gave them to another worker)."""
        if not ids:
            return
        for job_id in ids:
            if job_id in self.claims:
                log.warning("this worker no longer holds the job (its claim was given to another worker): its "
                            "%s write was refused and the job is dropped here", write, extra={"job_id": job_id})
        self._forget(ids)
        with self._lost_lock:
            self._lost |= set(ids)

    def take_lost(self) -> set[str]:
        """Ids whose writes were refused since the last call: drop them, neither failed nor given back."""
        with self._lost_lock:
            lost, self._lost = self._lost, set()
        return lost

    def lost(self) -> set[str]:
        """The ids `take_lost` would return, left in place."""
        with self._lost_lock:
            return set(self._lost)

    # running

    def mark_started(self, job: Claimed) -> None:
        self.mark_started_many([job])

    def mark_started_many(self, jobs: Sequence[Claimed]) -> None:
        """Jobs whose first image entered the sampler: running, in RQ's started registry, a started event."""
        if not jobs:
            return
        now = time.time()
        keys: list[str] = []
        args: list[Any] = [repr(now), rq_time(now), self.id, self.result_ttl_s, RQStatus.STARTED.value]
        data = json.dumps({"started_at": now, "worker": self.id}, separators=(",", ":"))
        for job in jobs:
            keys += [Keys.rq_job(job.id), StartedJobRegistry(job.spec.model, connection=self.conn).key,
                     Keys.job(job.id), events_key(job.id)]
            args += [self._token(job.id), f"{job.id}:{self.id}", data]
        lost = self._started(keys=keys, args=args)
        self._refused([jobs[i - 1].id for i in lost], "started")

    def report(self, progress: dict[str, dict[Any, Any]]) -> set[str]:
        """Write each job's progress fields; return the ids whose cancellation was requested."""
        return self.report_and_read(progress)[0]

    def report_and_read(self, progress: dict[str, dict[Any, Any]]) -> tuple[set[str], dict[str, int]]:
        """Write each job's progress fields (jobs still held) in one script call; return the ids whose
        cancellation was requested and, for those that asked for x0 previews, their k (job id -> k)."""
        ids = list(progress)
        if not ids:
            return set(), {}
        args: list[Any] = []
        for job_id in ids:
            args += [self._token(job_id), len(progress[job_id])]
            args += [item for pair in progress[job_id].items() for item in pair]
        reply = self._report(keys=[Keys.job(job_id) for job_id in ids], args=args)
        cancel, previews, lost = set(), {}, []
        for job_id, state, every in zip(ids, reply[0::2], reply[1::2], strict=True):
            if state == -1:
                lost.append(job_id)
                continue
            if state == 1:
                cancel.add(job_id)
            if every > 0:
                previews[job_id] = int(every)
        self._refused(lost, "progress")
        return cancel, previews

    def cancel_requested(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        with self.conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(Keys.job(job_id), "cancel")
            flags = pipe.execute()
        return {job_id for job_id, flag in zip(ids, flags, strict=True) if flag == b"1"}

    def store_pngs(self, pngs: list[tuple[str, int, bytes]], images: Sequence[tuple[str, ImageInfo]] = ()) -> set[str]:
        """(job id, image index, PNG bytes) triples, each with its image event when `images` has its (job id,
        info), in one script call (store_images). Returns the ids refused (no longer held)."""
        infos = {(job_id, info.index): info for job_id, info in images}
        by_job: dict[str, list[tuple[ImageInfo | None, int, bytes]]] = {}
        for job_id, index, data in pngs:
            by_job.setdefault(job_id, []).append((infos.get((job_id, index)), index, data))
        return self._store_all(list(by_job.items()))

    def store_images(self, stores: Sequence[tuple[str, Sequence[tuple[ImageInfo, bytes]]]]) -> set[str]:
        """Finished images of jobs, (job id, [(info, PNG)]), each kept at once (PNG, its info for a rerun,
        an image event), in one script call, for the jobs this worker still holds: a rerun after a worker
        death recomputes only the images not stored yet. Returns the ids refused (no longer held)."""
        return self._store_all([(job_id, [(info, info.index, data) for info, data in images])
                                for job_id, images in stores])

    def _store_all(self, stores: list[tuple[str, list[tuple[ImageInfo | None, int, bytes]]]]) -> set[str]:
        if not stores:
            return set()
        keys: list[str] = []
        args: list[Any] = [self.result_ttl_s]
        for job_id, images in stores:
            keys += [Keys.job(job_id), Keys.images(job_id), events_key(job_id)]
            keys += [Keys.png(job_id, index) for _, index, _ in images]
            args += [self._token(job_id), len(images)]
            for info, index, data in images:
                args += [index, data, "" if info is None else info.model_dump_json()]
        lost = {stores[i - 1][0] for i in self._store(keys=keys, args=args)}
        self._refused(lost, "image")
        return lost

    def publish_progress(self, events: list[tuple[str, dict[str, Any], list[Frame]]]) -> set[str]:
        """Append (job id, data, frames) progress events to the streams of the jobs still held: one script
        call per network evaluation, whatever the batch holds (a pipeline of XADDs takes twice as long).
        Returns the ids whose frames no longer fit in their stream's bound (also kept in `spent`): make
        no more previews for them."""
        if not events:
            return set()
        keys: list[str] = []
        args: list[Any] = [self.preview_limit, self.progress_limit]
        for job_id, data, frames in events:
            keys += [Keys.job(job_id), events_key(job_id)]
            args += [self._token(job_id), json.dumps(data, separators=(",", ":")), len(frames)]
            args += [item for frame in frames for item in (f"f:{frame.index}", frame.png)]
        lost, spent = self._publish(keys=keys, args=args)
        self._refused([events[i - 1][0] for i in lost], "progress event")
        newly = {events[i - 1][0] for i in spent}
        self.spent |= newly
        return newly

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
        transaction; returns their ids. A job missing from the list (or, in ours, held with another claim
        generation than this worker's) was given to another worker by the reaper: nothing is written for
        it. The list is WATCHed: whatever changes a job's claim (a requeue, another terminal write) takes
        its id out of the list in the same step."""
        claimed_key = claimed_key or self.claimed_key
        ours = claimed_key == self.claimed_key
        while True:
            with self.conn.pipeline() as pipe:
                try:
                    pipe.watch(claimed_key)
                    with self.conn.pipeline(transaction=False) as reads:  # one round trip, under the WATCH
                        reads.lrange(claimed_key, 0, -1)
                        for outcome in outcomes:
                            reads.hget(Keys.job(outcome.job_id), CLAIM)
                        listed, *claims = reads.execute()
                    held = {text(raw) for raw in listed}
                    mine = [o for o, claim in zip(outcomes, claims, strict=True)
                            if o.job_id in held and (not ours or self._holds(o.job_id, claim))]
                    if mine:
                        pipe.multi()
                        finish(self.conn, pipe, mine, result_ttl=self.result_ttl_s, failure_ttl=self.failure_ttl_s,
                               worker=self.id)
                        for outcome in mine:
                            pipe.lrem(claimed_key, 1, outcome.job_id)
                            add_event(pipe, outcome.job_id, *_terminal_event(outcome), ttl_s=self.result_ttl_s,
                                      claim=self.claims.get(outcome.job_id) if ours else None)
                        pipe.execute()
                except WatchError:
                    continue
            if ours:
                self._forget([o.job_id for o in outcomes])
            return {o.job_id for o in mine}

    def _holds(self, job_id: str, claim: bytes | None) -> bool:
        """Whether the claim generation read from Redis is the one this worker claimed the job with (a job
        in our list that this process never learnt it claimed counts as held: the list says so)."""
        mine = self.claims.get(job_id)
        return mine is None or (claim is not None and int(claim) == mine)

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
        self._forget(list(self.claims))

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
