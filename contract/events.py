"""Job events: what a job's watchers see (gRPC streams, Server-Sent Events): layout and writer. No torch.

The worker appends each job's events to a Redis stream of its own; the gateway reads it from the
start, so a watcher that connects late gets what it missed, and any number can watch one job:

    edm:events:{id}   stream, one entry per event: `type`, `data` (JSON), `claim` (the claim
                      generation of the worker that wrote it: see contract/ledger.py) and, for
                      progress with previews, one `f:{index}` field per image (PNG bytes of its x0
                      estimate). Bounded in bytes (below); expires with the results.
    edm:job:{id}      field `preview_every` (k): previews with every k-th evaluation; 0 or absent: none
                      field `event_bytes`: bytes written to the job's stream so far (every run)

Events, in order: started (the worker began; again after a rerun), progress (one per network
evaluation), image (one per finished image; its PNG stays in edm:png:{id}:{k} and is read by the
gateway), then done or error (written in the transaction that ends the job). `queued` is not
stored: the gateway derives it from the queue while the job waits, and derives the end of a job
that ended without a stream entry (cancelled while queued, or a stream that expired).

Bound (EDM_EVENT_STREAM_BYTES = B, 16 MiB by default; bytes = the entries' field names and values,
counted in `event_bytes` by the scripts that write them, worker/queue.py). Nothing is ever trimmed
from a stream, so a watcher that reads it from the start sees every image and the end:

* x0 previews (the `f:*` fields of progress events) are attached only while the stream stays
  within B - B/4; once a job's previews no longer fit, its worker stops making them;
* progress events without previews are written while the stream stays within B - B/8;
* started, image, done and error events are always written: the last B/8 is theirs (a 256-image
  job's image events take about 0.2 MB, a rerun's started event about 100 bytes).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from contract.ledger import Keys, text

TYPES = ("queued", "started", "progress", "image", "done", "error")
TERMINAL = ("done", "error")
PREVIEW_FIELD = "preview_every"
BYTES_FIELD = "event_bytes"      # edm:job:{id}: bytes of the job's stream entries so far
CLAIM_FIELD = "claim"            # a stream entry: the claim generation of the worker that wrote it
EVENT_STREAM_BYTES = 16 << 20    # default bound of one job's stream (EDM_EVENT_STREAM_BYTES)


def stream_limits(bound: int) -> tuple[int, int]:
    """(previews, progress): a progress event carries its x0 previews only if the stream stays within
    the first, and is written at all only if it stays within the second; the rest of `bound` is kept
    for started, image, done and error events, which are always written."""
    return bound - bound // 4, bound - bound // 8


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

def add_event(pipe: Any, job_id: str, type_: str, data: dict[str, Any], *, ttl_s: int,
              claim: int | None = None) -> None:
    """Queue on `pipe` the XADD of one event (no previews), its bytes and the stream's expiry. Only
    terminal events take this path; the worker's other events are written by the scripts of
    worker/queue.py (same fields), which check its claim first."""
    fields: dict[str, str] = {"type": type_, "data": json.dumps(data, separators=(",", ":"))}
    if claim is not None:
        fields[CLAIM_FIELD] = str(claim)
    key = events_key(job_id)
    pipe.xadd(key, fields)  # type: ignore[arg-type]
    pipe.hincrby(Keys.job(job_id), BYTES_FIELD, sum(len(k) + len(v.encode()) for k, v in fields.items()))
    pipe.expire(key, ttl_s)


def decode_entry(job_id: str, entry_id: Any, fields: dict[Any, Any]) -> JobEvent:
    values = {text(k): v for k, v in fields.items()}
    frames = sorted((Frame(int(name[2:]), bytes(value)) for name, value in values.items() if name.startswith("f:")),
                    key=lambda f: f.index)
    return JobEvent(text(values["type"]), job_id, json.loads(values["data"]), tuple(frames), text(entry_id))
