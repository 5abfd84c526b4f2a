"""The event stream without processes: the worker's progress events and previews (no Redis), and
the gateway's event hub against a real Redis (stored, derived and resumed events, slow readers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import redis
import torch

from contract.events import Frame, JobEvent, events_key
from contract.jobs import ImageInfo, JobResult, JobSpec, JobStatus, SamplerParams
from contract.ledger import Outcome
from model.generate import EvalEvent
from model.images import decode_png, to_pixels
from service.events import Encodings, EventHub, Watcher
from service.ledger import Ledger
from service.loops import blocking
from tests.integration.servers import RedisServer
from tests.worker.test_batcher import job
from worker.batcher import plan_batch
from worker.metrics import WorkerMetrics
from worker.progress import BatchObserver, Published
from worker.queue import WorkerQueue


def test_one_progress_event_per_job_and_previews_only_for_the_jobs_that_asked() -> None:
    a, b = job("a", 2), job("b", 3, done=1)  # b's images 1 and 2 run in this batch
    batch = plan_batch([a, b], 8).batch
    published: list[list[Published]] = []
    heard: set[str] = set()
    observer = BatchObserver(batch, report=lambda progress: set(), cancelled=lambda: heard, aborted=lambda: False,
                             metrics=WorkerMetrics(), report_interval_s=0.0, publish=published.append,
                             previews=lambda ids: {"a": 2})
    x0 = torch.linspace(-1, 1, 4 * 64, dtype=torch.float64).reshape(4, 1, 8, 8)
    for nfe in (1, 2):
        observer.on_eval(EvalEvent(step=0, num_steps=18, sigma=80.0 / nfe, nfe=nfe, nfe_total=35, x0=x0,
                                   rows=[0, 1, 2, 3]))
    first, second = published
    assert [job_id for job_id, _, _ in first] == ["a", "b"]
    assert first[1][1] == {"step": 1, "num_steps": 18, "sigma": 80.0, "nfe": 1, "nfe_total": 35, "images_done": 1}
    assert [frames for _, _, frames in first] == [[], []]  # a: every 2nd evaluation; b: none
    frames = second[0][2]
    assert [f.index for f in frames] == [0, 1] and second[1][2] == []
    pixels = to_pixels(x0)
    for frame, row in zip(frames, (0, 1), strict=True):
        assert (decode_png(frame.png) == pixels[row]).all()

    heard.add("a")  # cancelled: its rows are dropped, its events stop
    observer.on_eval(EvalEvent(step=1, num_steps=18, sigma=20.0, nfe=3, nfe_total=35, x0=x0, rows=[0, 1, 2, 3]))
    assert [job_id for job_id, *_ in published[-1]] == ["b"]
    observer.on_eval(EvalEvent(step=17, num_steps=18, sigma=0.002, nfe=35, nfe_total=35, x0=x0[2:], rows=[2, 3]))
    assert published[-1][0][1]["images_done"] == 1 and published[-1][0][2] == []


def spec(images: int = 1) -> JobSpec:
    return JobSpec(model="m", seeds=list(range(images)), class_labels=[None] * images, sampler=SamplerParams())


async def _hub_test(book: Ledger, url: str, redis_conn: redis.Redis) -> None:
    hub = EventHub(url, timeout_s=2.0, ledger=book, blocking=blocking, buffer_bytes=1 << 20, check_s=0.05)
    hub.start()
    try:
        first, second = book.submit(spec(), "o")[0], book.submit(spec(), "o")[0]
        watcher = hub.watch(second)
        assert [(e.type, e.data) for e in await watcher.next(2)] == [("queued", {"position": 1})]
        assert await watcher.next(0.2) == []  # nothing new, same position
        book.cancel(first)
        assert [(e.type, e.data, e.id) for e in await watcher.next(2)] == [("queued", {"position": 0}, "")]
        book.cancel(second)  # cancelled while queued: no stream entry, so the hub derives the end
        (end,) = await watcher.next(2)
        assert (end.type, end.data["status"], end.id, watcher.finished) == ("error", "cancelled", "", True)
        assert not hub.feeds  # its last watcher finished: the hub reads that job no more

        third = book.submit(spec(2), "o", preview_every=3)[0]  # asked for in the transaction that queues it
        live = hub.watch(third)
        waiting = asyncio.ensure_future(hub.wait_end(third, 10))
        assert [e.type for e in await live.next(2)] == ["queued"]
        worker = WorkerQueue(redis_conn, "w1", result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=5, max_reruns=1)
        (claimed,) = worker.claim("m", 1)
        assert worker.preview_every([third]) == {third: 3}
        worker.mark_started(claimed)
        worker.publish_progress([(third, {"nfe": 1}, [Frame(1, b"x1"), Frame(0, b"x0")])])
        infos = [ImageInfo(index=k, seed=k, class_label=1, metadata={"k": str(k)}) for k in range(2)]
        worker.store_pngs([(third, k, b"png%d" % k) for k in range(2)], [(third, info) for info in infos])
        assert not waiting.done()
        worker.finish([Outcome(third, JobStatus.succeeded,
                               result=JobResult(images=infos, worker="w1", sampling_s=1.0))])
        assert await waiting is True
        seen: list[JobEvent] = []
        while not live.finished:
            seen += await live.next(2)
        events = [e async for e in _all(hub.watch(third))]  # a late watcher reads the stream itself
        assert [e.type for e in events] == ["started", "progress", "image", "image", "done"]
        assert [e.id for e in seen] == [e.id for e in events]  # the live one got the same, in order
        assert events[1].data == {"nfe": 1} and events[1].frames == (Frame(0, b"x0"), Frame(1, b"x1"))
        assert [e.frames[0].png for e in events if e.type == "image"] == [b"png0", b"png1"]
        assert events[-1].data == {"images": 2, "sampling_s": 1.0}
        resumed = [e async for e in _all(hub.watch(third, after=events[1].id))]
        assert [e.id for e in resumed] == [e.id for e in events[2:]]
        assert await hub.wait_end(third, 1) is True  # ended already: answered from the stream

        redis_conn.delete(events_key(third))  # the stream is gone, the result is not: derived from the result
        derived = [e async for e in _all(hub.watch(third))]
        assert [(e.type, e.id) for e in derived] == [("image", ""), ("image", ""), ("done", "")]
        assert derived[1].frames[0].png == b"png1" and derived[1].data["seed"] == 1

        gone = [e async for e in _all(hub.watch("no-such-job"))]
        assert [e.type for e in gone] == ["error"] and gone[0].data["message"] == "the job expired"
    finally:
        await hub.close()


async def _all(watcher: Watcher) -> AsyncIterator[JobEvent]:
    while not watcher.finished:
        events = await watcher.next(5)
        assert events, "no event within 5 s"
        for event in events:
            yield event


def test_hub_positions_stored_events_resume_and_derived_ends(redis_conn: redis.Redis,
                                                             redis_server: RedisServer) -> None:
    book = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    asyncio.run(_hub_test(book, redis_server.url, redis_conn))


async def _slow_reader_test(book: Ledger, url: str, redis_conn: redis.Redis) -> None:
    """A reader that does not read holds at most buffer_bytes; once it reads, it gets every event, in order."""
    hub = EventHub(url, timeout_s=2.0, ledger=book, blocking=blocking, buffer_bytes=20_000, check_s=0.05)
    hub.start()
    try:
        job_id = book.submit(spec(), "o", preview_every=1)[0]
        worker = WorkerQueue(redis_conn, "w1", result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=5, max_reruns=1)
        (claimed,) = worker.claim("m", 1)
        slow = hub.watch(job_id)
        assert [e.type for e in await slow.next(2)] == ["queued"]
        worker.mark_started(claimed)
        for nfe in range(1, 41):  # 40 previews of 4 kB: 160 kB, eight times the buffer
            worker.publish_progress([(job_id, {"nfe": nfe}, [Frame(0, bytes(4000))])])
        worker.finish([Outcome(job_id, JobStatus.failed, error="stopped for the test")])
        await asyncio.sleep(0.5)  # the hub reads all of it meanwhile; the watcher takes what fits
        assert slow._bytes <= 20_000 and slow.feed is None  # it fell behind: detached, bounded
        events = [e async for e in _all(slow)]
        assert [e.type for e in events] == ["started", *["progress"] * 40, "error"]
        assert [e.data["nfe"] for e in events if e.type == "progress"] == list(range(1, 41))
    finally:
        await hub.close()


def test_a_slow_reader_is_bounded_and_loses_nothing(redis_conn: redis.Redis, redis_server: RedisServer) -> None:
    book = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    asyncio.run(_slow_reader_test(book, redis_server.url, redis_conn))


def test_an_event_is_encoded_once_for_all_its_watchers_within_a_byte_bound() -> None:
    calls: list[str] = []

    def encode(event: JobEvent) -> str:
        calls.append(event.id)
        return "x" * 400

    cache = Encodings(max_bytes=1000)
    first, second, third = (JobEvent("progress", "j", {"nfe": k}, (), f"1-{k}") for k in range(3))
    assert [cache.get("sse", first, encode, len) for _ in range(3)] == ["x" * 400] * 3
    assert calls == ["1-0"]  # three watchers, one encoding
    cache.get("sse", second, encode, len)
    cache.get("sse", third, encode, len)  # 1,200 bytes: the least recently used one goes
    cache.get("sse", first, encode, len)
    assert calls == ["1-0", "1-1", "1-2", "1-0"]
    derived = JobEvent("queued", "j", {"position": 1})  # no stream id: never cached
    cache.get("sse", derived, encode, len)
    cache.get("sse", derived, encode, len)
    assert calls[-2:] == ["", ""]


async def _joiners_test(book: Ledger, url: str, redis_conn: redis.Redis) -> None:
    hub = EventHub(url, timeout_s=2.0, ledger=book, blocking=blocking, buffer_bytes=1 << 20, check_s=0.05)
    hub.start()
    try:
        job_id = book.submit(spec(), "o")[0]
        worker = WorkerQueue(redis_conn, "w1", result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=5, max_reruns=1)
        (claimed,) = worker.claim("m", 1)
        worker.mark_started(claimed)
        for nfe in range(1, 61):
            worker.publish_progress([(job_id, {"nfe": nfe}, [])])
        worker.finish([Outcome(job_id, JobStatus.failed, error="stopped for the test")])
        before = redis_conn.info("commandstats")["cmdstat_xrange"]["calls"]

        async def replay() -> list[str]:
            return [event.id async for event in _all(hub.watch(job_id))]

        seen = await asyncio.gather(*(replay() for _ in range(50)))
        reads = redis_conn.info("commandstats")["cmdstat_xrange"]["calls"] - before
        stored = [entry[0].decode() for entry in redis_conn.xrange(events_key(job_id))]
        assert all(ids == stored for ids in seen)  # 62 events each, in order
        assert reads <= 10, reads  # 4 full pages and the end, read once for 50 watchers (not 250 reads)
    finally:
        await hub.close()


def test_watchers_that_join_together_share_their_catch_up_reads(redis_conn: redis.Redis,
                                                                redis_server: RedisServer) -> None:
    book = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    asyncio.run(_joiners_test(book, redis_server.url, redis_conn))
