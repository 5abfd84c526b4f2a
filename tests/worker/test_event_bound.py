"""A job's event stream is bounded in bytes (contract/events.py): x0 previews are dropped first, then
progress events; started, image and terminal events are always written (real Redis, no processes)."""

from __future__ import annotations

import redis

from contract.events import Frame, events_key, stream_limits
from contract.jobs import ImageInfo, JobResult, JobSpec, JobStatus, SamplerParams
from contract.ledger import Keys, Outcome
from service.ledger import Ledger
from worker.queue import WorkerQueue

BOUND = 64 << 10


def stream_bytes(conn: redis.Redis, job_id: str) -> int:
    """What the bound counts: the field names and values of every entry."""
    return sum(len(k) + len(v) for _, fields in conn.xrange(events_key(job_id)) for k, v in fields.items())


def test_previews_then_progress_stop_at_their_limits_and_every_image_and_the_end_are_kept(
        redis_conn: redis.Redis) -> None:
    images = 16
    spec = JobSpec(model="m", seeds=list(range(images)), class_labels=[None] * images, sampler=SamplerParams())
    book = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    job_id = book.submit(spec, "o", preview_every=1)[0]
    w = WorkerQueue(redis_conn, "w1", result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=5, max_reruns=2,
                    event_stream_bytes=BOUND)
    (job,) = w.claim("m", 1)
    w.mark_started(job)
    previews, progress = stream_limits(BOUND)
    frames = [Frame(k, bytes(200)) for k in range(images)]  # ~3.3 KB of previews per evaluation
    spent_at = None
    for nfe in range(1, 1001):
        spent = w.publish_progress([(job_id, {"step": nfe, "nfe": nfe, "sigma": 1.0 / nfe}, frames)])
        if spent and spent_at is None:
            spent_at = nfe
            assert spent == {job_id} and w.spent == {job_id}
        used = int(redis_conn.hget(Keys.job(job_id), "event_bytes") or 0)
        assert used <= progress and (nfe % 100 or used == stream_bytes(redis_conn, job_id))
        if spent_at is None:
            assert used <= previews
    assert spent_at is not None and 10 < spent_at < 20  # previews stopped once 48 KiB were used
    kinds = [fields[b"type"] for _, fields in redis_conn.xrange(events_key(job_id))]
    with_frames = sum(b"f:0" in fields for _, fields in redis_conn.xrange(events_key(job_id)))
    assert with_frames == spent_at - 1 and kinds.count(b"progress") < 1000  # then progress events stopped

    infos = [ImageInfo(index=k, seed=k, class_label=k % 10, metadata={"edm:model": "m", "edm:seed": str(k)})
             for k in range(images)]
    assert w.store_images([(job_id, [(info, b"png") for info in infos])]) == set()
    result = JobResult(images=infos, worker="w1", sampling_s=1.0)
    assert w.finish([Outcome(job_id, JobStatus.succeeded, result=result)]) == {job_id}
    entries = redis_conn.xrange(events_key(job_id))
    assert [fields[b"type"] for _, fields in entries][-images - 1:] == [b"image"] * images + [b"done"]
    assert entries[0][1][b"type"] == b"started"
    total = stream_bytes(redis_conn, job_id)
    assert total == int(redis_conn.hget(Keys.job(job_id), "event_bytes") or 0) <= BOUND
    memory = redis_conn.memory_usage(events_key(job_id), samples=0)
    assert memory is not None and memory <= BOUND * 1.25, memory  # Redis's own overhead on top of the fields


def test_a_job_without_previews_is_not_spent(redis_conn: redis.Redis) -> None:
    spec = JobSpec(model="m", seeds=[0], class_labels=[None], sampler=SamplerParams())
    job_id = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60).submit(spec, "o")[0]
    w = WorkerQueue(redis_conn, "w1", result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=5, max_reruns=2,
                    event_stream_bytes=BOUND)
    w.claim("m", 1)
    for nfe in range(1, 2000):
        assert w.publish_progress([(job_id, {"nfe": nfe}, [])]) == set()
    assert w.spent == set() and stream_bytes(redis_conn, job_id) <= stream_limits(BOUND)[1]
