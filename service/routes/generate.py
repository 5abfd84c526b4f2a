"""Synchronous generation: POST /v1/generate waits for the images (up to EDM_SYNC_TIMEOUT_S).

The answer's form follows the Accept header: `image/png` -> the PNG itself (one image only,
else 406); `application/json` -> JSON with base64 PNGs; anything else -> PNG for one image,
JSON for several. If the job is not done in time: 202 with Location and the job's status.

Waiting takes no thread and no Redis connection: the route waits on the gateway's event hub
(service/events.py) for the job's terminal event. At most EDM_MAX_WAITING requests wait at once
per gateway; more get 429 before any job is made. A client that disconnects while it waits stops
the waiting; its job is cancelled unless the request carried an Idempotency-Key (then a retry
with that key finds the job going on, or done).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from contract.jobs import JobStatus
from service.deps import (
    CatalogDep,
    HubDep,
    IdempotencyKeyDep,
    LedgerDep,
    MetricsDep,
    OwnerDep,
    SettingsDep,
    WaitingDep,
)
from service.errors import Problem
from service.events import EventHub, HubClosed
from service.jobs import abandon, admit, job_url, job_view, resolve_request, visible_record
from service.ledger import JobRecord, Ledger
from service.loops import blocking
from service.schemas import GeneratedImageJSON, GenerateRequest, GenerateResponse

router = APIRouter(prefix="/v1", tags=["generate"])


def wanted_form(accept: str) -> str:
    """'png', 'json' or 'auto' from an Accept header (quality values are ignored)."""
    types = {part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()}
    png, json_ = "image/png" in types, "application/json" in types
    if png and not json_:
        return "png"
    if json_ and not png:
        return "json"
    return "auto"


@router.post("/generate", responses={200: {"content": {"image/png": {}}, "model": GenerateResponse},
                                     202: {"description": "not done within the sync timeout"}})
async def generate(body: GenerateRequest, request: Request, settings: SettingsDep, ledger: LedgerDep,
                   catalog: CatalogDep, metrics: MetricsDep, hub: HubDep, waiting: WaitingDep, owner: OwnerDep,
                   idempotency_key: IdempotencyKeyDep = None) -> Response:
    started = time.perf_counter()
    form = wanted_form(request.headers.get("accept", ""))
    with waiting.take():
        spec = await blocking(lambda: resolve_request(body, settings, ledger, catalog))
        if form == "png" and spec.num_images != 1:
            raise Problem(406, f"Accept: image/png returns one image, but this request makes {spec.num_images}; "
                          "accept application/json")
        job_id, _ = await blocking(lambda: admit(spec, owner, settings=settings, ledger=ledger, metrics=metrics,
                                                 idempotency_key=idempotency_key, body=body))
        ended = await _wait_or_leave(hub, job_id, settings.sync_timeout_s, request)
        if ended is None:  # the client has gone
            if idempotency_key is None:
                await blocking(lambda: abandon(ledger, metrics, job_id))
            return Response(status_code=499)
        return await blocking(lambda: _answer(ledger, metrics, job_id, owner, form, started))


async def _wait_or_leave(hub: EventHub, job_id: str, timeout_s: float, request: Request) -> bool | None:
    """True: the job ended; False: `timeout_s` passed first; None: the client disconnected."""
    waiting = asyncio.ensure_future(hub.wait_end(job_id, timeout_s))
    leaving = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((waiting, leaving), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, leaving):
            task.cancel()
        await asyncio.gather(waiting, leaving, return_exceptions=True)
    if waiting.done() and not waiting.cancelled() and waiting.exception() is None:
        return waiting.result()
    if leaving.done() and not leaving.cancelled():
        return None
    try:
        return waiting.result()  # raises what the wait raised (e.g. Redis unreachable)
    except HubClosed:
        raise Problem(503, f"the gateway is shutting down; job {job_id} goes on", job_id=job_id,
                      headers={"Retry-After": "1", "Location": job_url(job_id)}) from None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body was read: receive() has nothing else)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _answer(ledger: Ledger, metrics: Any, job_id: str, owner: str, form: str, started: float) -> Response:
    record = visible_record(ledger, job_id, owner)
    if record.status is JobStatus.succeeded and record.result is not None:
        metrics.generate_seconds.labels(record.spec.model).observe(time.perf_counter() - started)
        if form == "png" or (form == "auto" and record.spec.num_images == 1):
            return _png_response(ledger, record)
        return _json_response(ledger, record)
    if record.status is JobStatus.failed:
        raise Problem(500, f"generation failed: {record.error}", job_id=job_id)
    if record.status is JobStatus.cancelled:
        raise Problem(409, f"job {job_id} was cancelled", job_id=job_id)
    return JSONResponse(job_view(record).model_dump(mode="json"), status_code=202,
                        headers={"Location": job_url(job_id)})


def _png_response(ledger: Ledger, record: JobRecord) -> Response:
    assert record.result is not None
    image = record.result.images[0]
    data = _png(ledger, record.id, 0)
    return Response(data, media_type="image/png", headers={
        "X-Job-Id": record.id, "X-Seed": str(image.seed), "X-Class-Label": str(image.class_label),
        "Content-Location": f"{job_url(record.id)}/images/0.png", "Server-Timing": server_timing(record)})


def _json_response(ledger: Ledger, record: JobRecord) -> JSONResponse:
    assert record.result is not None
    view = job_view(record)
    pngs = ledger.pngs(record.id, len(record.result.images))
    if any(data is None for data in pngs):
        raise Problem(410, f"the images of job {record.id} have expired")
    images = [GeneratedImageJSON(index=i.index, seed=i.seed, class_label=i.class_label, metadata=i.metadata,
                                 png_base64=base64.b64encode(data).decode())  # type: ignore[arg-type]
              for i, data in zip(record.result.images, pngs, strict=True)]
    body = GenerateResponse(job_id=record.id, model=record.spec.model, images=images, timings=view.timings)
    return JSONResponse(body.model_dump(mode="json"), headers={"Content-Location": job_url(record.id),
                                                               "Server-Timing": server_timing(record)})


def server_timing(record: JobRecord) -> str:
    """Where the job's time went, in ms (W3C Server-Timing): queued, sampling, submit -> done."""
    timings = job_view(record).timings
    parts = [(name, value) for name, value in (("queue", timings.queue_wait_s), ("sampling", timings.sampling_s),
                                               ("job", timings.total_s)) if value is not None]
    return ", ".join(f"{name};dur={value * 1000:.1f}" for name, value in parts)


def _png(ledger: Ledger, job_id: str, index: int) -> bytes:
    data = ledger.png(job_id, index)
    if data is None:
        raise Problem(410, f"the images of job {job_id} have expired")
    return data
