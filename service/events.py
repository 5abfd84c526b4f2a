"""Job events: what a job's watchers see (gRPC streams, Server-Sent Events). No torch.

The worker appends each job's events to a Redis stream of its own; the gateway reads it from the
start, so a watcher that connects late gets what it missed, and any number can watch one job:

    edm:events:{id}   stream, one entry per event: `type`, `data` (JSON) and, for progress with
                      previews, one `f:{index}` field per image (PNG bytes of its x0 estimate).
                      Capped near STREAM_MAXLEN entries (oldest first); expires with the results.
    edm:job:{id}      field `preview_every` (k): previews with every k-th evaluation; 0 or absent: none

Events, in order: started (the worker began; again after a rerun), progress (one per network
evaluation), image (one per finished image; its PNG stays in edm:png:{id}:{k} and is read by the
gateway), then done or error (written in the transaction that ends the job). `queued` is not
stored: the gateway derives it from the queue while the job waits, and derives the end of a job
that ended without a stream entry (cancelled while queued, or a stream that expired).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.contract import JobStatus
from service.ledger import Keys, Ledger, text

TYPES = ("queued", "started", "progress", "image", "done", "error")
TERMINAL = ("done", "error")
STREAM_MAXLEN = 4096  # entries per job (approximate trim): 2N-1 evaluations for N <= 1000 steps, and more
PREVIEW_FIELD = "preview_every"


def events_key(job_id: str) -> str:
    return f"edm:events:{job_id}"


@dataclass(frozen=True)
class Frame:
    """One image's PNG: an x0 preview in a progress event, the final image in an image event."""

    index: int
    png: bytes


@dataclass(frozen=True)
class JobEvent:
    type: str
    job_id: str
    data: dict[str, Any]
    frames: tuple[Frame, ...] = ()
    id: str = field(default="")  # the stream entry id; "" for events the gateway derived

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL

    def to_json(self) -> dict[str, Any]:
        """The Server-Sent Events payload: the data fields, PNGs in base64."""
        body: dict[str, Any] = {"type": self.type, "job_id": self.job_id, "event_id": self.id or None, **self.data}
        if self.type == "progress":
            body["frames"] = [{"index": f.index, "png_base64": base64.b64encode(f.png).decode()}
                              for f in self.frames]
        elif self.type == "image":
            body["png_base64"] = base64.b64encode(self.frames[0].png).decode() if self.frames else None
        return body


# -- writing (the worker) ---------------------------------------------------------------------------

def add_event(pipe: Any, job_id: str, type_: str, data: dict[str, Any], frames: Sequence[Frame] = (), *,
              ttl_s: int) -> None:
    """Queue on `pipe` the XADD of one event and the stream's expiry. (Progress events, one per network
    evaluation, take a faster path: WorkerQueue.publish_progress, with the same fields.)"""
    fields: dict[str, bytes | str] = {"type": type_, "data": json.dumps(data, separators=(",", ":"))}
    fields.update({f"f:{frame.index}": frame.png for frame in frames})
    key = events_key(job_id)
    pipe.xadd(key, fields, maxlen=STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]
    pipe.expire(key, ttl_s)


def decode_entry(job_id: str, entry_id: Any, fields: dict[Any, Any]) -> JobEvent:
    values = {text(k): v for k, v in fields.items()}
    frames = sorted((Frame(int(name[2:]), bytes(value)) for name, value in values.items() if name.startswith("f:")),
                    key=lambda f: f.index)
    return JobEvent(text(values["type"]), job_id, json.loads(values["data"]), tuple(frames), text(entry_id))


# -- reading (the gateway) --------------------------------------------------------------------------

class EventReader:
    """A job's events from its first (or after `after`), then live ones until the job ends.

    poll() returns what is new, waiting up to `block_s` when nothing is; once it has returned the
    terminal event (done / error), `finished` is True. It reads through the ledger's connection and
    raises redis.RedisError when Redis is away.
    """

    def __init__(self, ledger: Ledger, job_id: str, *, after: str = "", block_s: float = 0.25):
        self.ledger = ledger
        self.job_id = job_id
        self.cursor = after or "0-0"
        socket_timeout = ledger.conn.connection_pool.connection_kwargs.get("socket_timeout")
        if socket_timeout:  # a blocking read must return before the socket gives up on it
            block_s = min(block_s, socket_timeout / 2)
        self.block_ms = max(1, int(block_s * 1000))
        self.finished = False
        self._started = bool(after)  # resuming: the job was seen past its queue
        self._position: int | None = None
        self._first = True

    def poll(self) -> list[JobEvent]:
        if self.finished:
            return []
        if self._first:
            self._first = False
            queued = self._queued()
            if queued:
                return queued
        events = self._read(block=True)
        if events:
            return events
        return self._idle()

    def _read(self, *, block: bool) -> list[JobEvent]:
        reply: Any = self.ledger.conn.xread({events_key(self.job_id): self.cursor}, count=512,
                                            block=self.block_ms if block else None)
        out: list[JobEvent] = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                event = decode_entry(self.job_id, entry_id, fields)
                self.cursor = event.id
                if event.type == "started":
                    self._started = True
                if event.type == "image":
                    event = self._with_png(event)
                out.append(event)
                if event.terminal:
                    self.finished = True
                    return out
        return out

    def _with_png(self, event: JobEvent) -> JobEvent:
        png = self.ledger.png(self.job_id, int(event.data["index"]))
        return JobEvent(event.type, event.job_id, event.data, () if png is None else (Frame(event.data["index"], png),),
                        event.id)

    def _idle(self) -> list[JobEvent]:
        """Nothing new: report a changed queue position, or the end of a job that has no stream entry for it."""
        status = self.ledger.status(self.job_id)
        if status is None:
            self.finished = True
            return [JobEvent("error", self.job_id, {"status": "failed", "message": "the job expired"})]
        if status.terminal:
            # The worker writes the terminal entry in the transaction that ends the job: read once more.
            events = self._read(block=False)
            if events and self.finished:
                return events
            return events + self._derived_end()
        if status is JobStatus.queued:
            return self._queued()
        return []

    def _queued(self) -> list[JobEvent]:
        if self._started:
            return []
        record = self.ledger.record(self.job_id)
        if record is None or record.status is not JobStatus.queued or record.queue_position is None:
            return []
        if record.queue_position == self._position:
            return []
        self._position = record.queue_position
        return [JobEvent("queued", self.job_id, {"position": record.queue_position})]

    def _derived_end(self) -> list[JobEvent]:
        self.finished = True
        record = self.ledger.record(self.job_id)
        if record is None:
            return [JobEvent("error", self.job_id, {"status": "failed", "message": "the job expired"})]
        if record.status is JobStatus.succeeded and record.result is not None:
            images = record.result.images
            pngs = self.ledger.pngs(self.job_id, len(images))
            out = [JobEvent("image", self.job_id, i.model_dump(mode="json"),
                            () if png is None else (Frame(i.index, png),)) for i, png in zip(images, pngs, strict=True)]
            return out + [JobEvent("done", self.job_id, {"images": len(images),
                                                         "sampling_s": round(record.result.sampling_s, 4)})]
        return [JobEvent("error", self.job_id, {"status": record.status.value,
                                                "message": record.error or record.status.value})]


def last_event(ledger: Ledger, job_id: str) -> JobEvent | None:
    """The newest stored event of a job (None when its stream is empty or gone)."""
    entries: Any = ledger.conn.xrevrange(events_key(job_id), count=1)
    if not entries:
        return None
    entry_id, fields = entries[0]
    return decode_entry(job_id, entry_id, fields)


def set_preview_every(ledger: Ledger, job_id: str, every: int) -> None:
    """Ask the worker for x0 previews of this job with every k-th evaluation (0: none)."""
    ledger.conn.hset(Keys.job(job_id), PREVIEW_FIELD, every)
