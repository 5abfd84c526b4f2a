"""GET /v1/jobs/{id}/events: a job's events as Server-Sent Events (the gRPC streams' events).

Each event has `event:` its type (queued, started, progress, image, done, error), `data:` JSON
(PNGs in base64: progress `frames`, image `png_base64`) and, when it was read from the job's
stream, `id:`, so a client that reconnects (EventSource does, with Last-Event-ID) resumes where it
was. A connection opened late first replays the job's events from its start. The stream ends
after done or error; a reconnection after that is answered 204 (EventSource stops there).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio.to_thread
import redis
from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse

from contract.events import JobEvent
from service.deps import LedgerDep, OwnerDep
from service.errors import invalid
from service.events import EventReader, last_event
from service.jobs import visible_record

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("service.events")
_STREAM_ID = re.compile(r"^\d+(-\d+)?$")
KEEPALIVE_S = 15.0


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}},
                       204: {"description": "resumed after the job's last event: nothing more will come"}})
def job_events(job_id: str, ledger: LedgerDep, owner: OwnerDep,
               last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
               after: Annotated[str | None, Query(max_length=64, description="resume after this event id")] = None,
               ) -> Response:
    visible_record(ledger, job_id, owner)
    resume = last_event_id or after or ""
    if resume and not _STREAM_ID.match(resume):
        raise invalid("Last-Event-ID" if last_event_id else "after", "expected the id of one of this job's events")
    if resume:
        last = last_event(ledger, job_id)
        if last is not None and last.terminal and _order(last.id) <= _order(resume):
            return Response(status_code=204)
    reader = EventReader(ledger, job_id, after=resume)
    return StreamingResponse(_stream(reader), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(reader: EventReader) -> AsyncIterator[str]:
    quiet_since = time.monotonic()
    while not reader.finished:
        try:
            events = await anyio.to_thread.run_sync(reader.poll)
        except redis.RedisError as error:  # end here: the client reconnects with Last-Event-ID
            log.warning("event stream ended, Redis unavailable: %s", error, extra={"job_id": reader.job_id})
            return
        for event in events:
            yield sse(event)
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()


def sse(event: JobEvent) -> str:
    lines = [f"id: {event.id}"] if event.id else []
    lines += [f"event: {event.type}", "data: " + json.dumps(event.to_json(), separators=(",", ":"))]
    return "\n".join(lines) + "\n\n"


def _order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
