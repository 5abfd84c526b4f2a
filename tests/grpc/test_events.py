"""The event stream without processes: the worker's progress events and previews (no Redis), and
the gateway's reader against a real Redis (stored, derived and resumed events)."""

from __future__ import annotations

import redis
import torch

from contract.events import Frame, events_key
from contract.jobs import ImageInfo, JobResult, JobSpec, JobStatus, SamplerParams
from contract.ledger import Outcome
from model.generate import EvalEvent
from model.images import decode_png, to_pixels
from service.events import EventReader
from service.ledger import Ledger
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


def test_reader_positions_stored_events_resume_and_derived_ends(redis_conn: redis.Redis) -> None:
    book = Ledger(redis_conn, result_ttl_s=60, failure_ttl_s=60)
    first, second = book.submit(spec(), "o")[0], book.submit(spec(), "o")[0]
    reader = EventReader(book, second, block_s=0.05)
    assert [(e.type, e.data) for e in reader.poll()] == [("queued", {"position": 1})]
    assert reader.poll() == []  # nothing new, same position
    book.cancel(first)
    assert [(e.type, e.data, e.id) for e in reader.poll()] == [("queued", {"position": 0}, "")]
    book.cancel(second)  # cancelled while queued: no stream entry, so the reader derives the end
    (end,) = reader.poll()
    assert (end.type, end.data["status"], end.id, reader.finished) == ("error", "cancelled", "", True)

    third = book.submit(spec(2), "o", preview_every=3)[0]  # asked for in the transaction that queues it
    worker = WorkerQueue(redis_conn, "w1", result_ttl_s=60, failure_ttl_s=60, heartbeat_ttl_s=5, max_reruns=1)
    (claimed,) = worker.claim("m", 1)
    assert worker.preview_every([third]) == {third: 3}
    worker.mark_started(claimed)
    worker.publish_progress([(third, {"nfe": 1}, [Frame(1, b"x1"), Frame(0, b"x0")])])
    infos = [ImageInfo(index=k, seed=k, class_label=1, metadata={"k": str(k)}) for k in range(2)]
    worker.store_pngs([(third, k, b"png%d" % k) for k in range(2)], [(third, info) for info in infos])
    worker.finish([Outcome(third, JobStatus.succeeded, result=JobResult(images=infos, worker="w1", sampling_s=1.0))])
    events = EventReader(book, third).poll()
    assert [e.type for e in events] == ["started", "progress", "image", "image", "done"]
    assert events[1].data == {"nfe": 1} and events[1].frames == (Frame(0, b"x0"), Frame(1, b"x1"))
    assert [e.frames[0].png for e in events if e.type == "image"] == [b"png0", b"png1"]
    assert events[-1].data == {"images": 2, "sampling_s": 1.0}
    resumed = EventReader(book, third, after=events[1].id).poll()
    assert [e.id for e in resumed] == [e.id for e in events[2:]]

    redis_conn.delete(events_key(third))  # the stream is gone, the result is not: derived from the result
    reader = EventReader(book, third, block_s=0.05)
    derived = reader.poll() + reader.poll()
    assert [(e.type, e.id) for e in derived] == [("image", ""), ("image", ""), ("done", "")]
    assert derived[1].frames[0].png == b"png1" and derived[1].data["seed"] == 1

    gone = EventReader(book, "no-such-job", block_s=0.05)
    assert [e.type for e in gone.poll()] == ["error"] and gone.finished
