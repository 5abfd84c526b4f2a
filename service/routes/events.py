"""GET /v1/jobs/{id}/events: a job's events as Server-Sent Events (the gRPC streams' events).

Each event has `event:` its type (queued, started, progress, image, done, error), `data:` JSON
(PNGs in base64: progress `frames`, image `png_base64`) and, when it was read from the job's
stream, `id:`, so a client that reconnects (EventSource does, with Last-Event-ID) resumes where it
was. A connection opened late first replays the job's events from its start. The stream ends
after done or error; a reconnection after that is answered 204 (EventSource stops there).

A stream holds no thread and no Redis connection: it reads from the gateway's event hub
(service/events.py). At most EDM_MAX_STREAMS streams (SSE and gRPC together) are open per
gateway; more get 429. A client that closes its connection releases its place at once.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse

from contract.events import JobEvent
from service.capacity import Slot
from service.deps import HubDep, LedgerDep, OwnerDep, StreamsDep
from service.errors import invalid
from service.events import Encodings, HubClosed, Watcher, stream_order
from service.jobs import check_owner
from service.loops import blocking
from service.schemas import JobId
from service.validation import known_job_id

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("service.events")
_STREAM_ID = re.compile(r"^\d+(-\d+)?$")
KEEPALIVE_S = 15.0


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}},
                       204: {"description": "resumed after the job's last event: nothing more will come"}})
async def job_events(job_id: JobId, ledger: LedgerDep, hub: HubDep, streams: StreamsDep, owner: OwnerDep,
                     last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
                     after: Annotated[str | None, Query(max_length=64, description="resume after this event id")]
                     = None) -> Response:
    for name, value in (("Last-Event-ID", last_event_id), ("after", after)):
        if value and not _STREAM_ID.match(value):
            raise invalid(name, "expected the id of one of this job's events")
    resume = last_event_id or after or ""
    await blocking(lambda: check_owner(ledger, known_job_id(job_id), owner))
    if resume:
        last = await hub.last_event(job_id)
        if last is not None and last.terminal and stream_order(last.id) <= stream_order(resume):
            return Response(status_code=204)
    return EventStream(hub.watch(job_id, after=resume), streams.take(), hub.encodings)


class EventStream(StreamingResponse):
    """The stream of one watcher; whichever way the response ends (done, client gone, shutdown, or
    before it started), the watcher and its place in EDM_MAX_STREAMS are released."""

    def __init__(self, watcher: Watcher, slot: Slot, encodings: Encodings):
        super().__init__(_stream(watcher, encodings), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.watcher = watcher
        self.slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.watcher.close()
            self.slot.release()


async def _stream(watcher: Watcher, encodings: Encodings) -> AsyncIterator[str]:
    """The job's events until its last; a keep-alive comment when nothing came for KEEPALIVE_S. Ends
    early when Redis is unreachable or the gateway stops: the client resumes with Last-Event-ID."""
    try:
        while not watcher.finished:
            events = await watcher.next(KEEPALIVE_S)
            if not events and not watcher.finished:
                yield ": keep-alive\n\n"
            for event in events:
                yield encodings.get("sse", event, sse, len)
    except redis.RedisError as error:
        log.warning("event stream ended, Redis unavailable: %s", error, extra={"job_id": watcher.job_id})
    except HubClosed:
        pass


def sse(event: JobEvent) -> str:
    lines = [f"id: {event.id}"] if event.id else []
    lines += [f"event: {event.type}", "data: " + json.dumps(event.to_json(), separators=(",", ":"))]
    return "\n".join(lines) + "\n\n"
