"""Job events: what a job's watchers see (gRPC streams, Server-Sent Events): layout and writer. No torch.

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

from contract.ledger import text

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
