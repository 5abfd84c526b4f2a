"""Reading job events for watchers (gRPC streams, Server-Sent Events); their layout and the writer
the worker uses are contract/events.py. No torch."""

from __future__ import annotations

from typing import Any

from contract.events import Frame, JobEvent, decode_entry, events_key
from contract.jobs import JobStatus
from service.ledger import Ledger

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
