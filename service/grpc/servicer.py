"""edm.v1.GenerationService: the REST API's operations over gRPC, plus event streams.

Each handler authenticates the call, then does what its REST twin does with the same code
(service/jobs.py, validation.py, the ledger); the events come from the job's Redis stream through
service/events.py. A Generate or GenerateStream call that ends before its job (the client
cancelled, its deadline passed) cancels the job: it stops at its next network evaluation.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import redis

from contract.events import JobEvent
from contract.jobs import JobStatus
from contract.ledger import Keys, text
from service.events import EventReader
from service.grpc import convert
from service.grpc.auth import owner_of_call
from service.grpc.errors import RpcFailure, invalid_argument
from service.grpc.stubs import service_grpc, service_pb2
from service.jobs import admit, resolve_request, visible_record
from service.ledger import Ledger

log = logging.getLogger("service.grpc")
_STREAM_ID = re.compile(r"^\d+(-\d+)?$")


class Servicer(service_grpc.GenerationServiceServicer):
    """Reads the gateway's app.state (settings, catalog, metrics, key_hashes, ledger), like the routes."""

    def __init__(self, state: Any, *, stopping: threading.Event, block_s: float = 0.25):
        self.state = state
        self.stopping = stopping  # set while the server shuts down: streams end, jobs go on
        self.block_s = block_s

    @property
    def ledger(self) -> Ledger:
        ledger: Ledger | None = self.state.ledger
        if ledger is None:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "the gateway is starting or stopping")
        return ledger

    def _owner(self, context: grpc.ServicerContext) -> str:
        return owner_of_call(context.invocation_metadata(), self.state.key_hashes)

    # generation

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        owner = self._owner(context)
        job_id = self._submit(request.spec, owner, context)
        ended = self._cancel_when_abandoned(job_id, context)
        self._wait(job_id, context)
        if not context.is_active():  # the caller is gone (cancelled, deadline): so is its job
            return service_pb2.GenerateResponse()
        ended.set()
        record = visible_record(self.ledger, job_id, owner)
        if record.status is JobStatus.succeeded and record.result is not None:
            pngs = self.ledger.pngs(job_id, len(record.result.images))
            if any(png is None for png in pngs):
                raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"the images of job {job_id} have expired")
            self.state.metrics.generate_seconds.labels(record.spec.model).observe(time.perf_counter() - started)
            message = convert.job(record, pngs)
            return service_pb2.GenerateResponse(job_id=job_id, model=record.spec.model, images=message.images,
                                                timings=message.timings)
        if record.status is JobStatus.cancelled:
            raise RpcFailure(grpc.StatusCode.ABORTED, f"job {job_id} was cancelled")
        raise RpcFailure(grpc.StatusCode.INTERNAL, f"generation failed: {record.error}")

    def GenerateStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        owner = self._owner(context)
        every = request.preview_every if request.HasField("preview_every") else 1
        job_id = self._submit(request.spec, owner, context, preview_every=every)
        ended = self._cancel_when_abandoned(job_id, context)
        for event in self._events(job_id, "", context):
            if event.terminal:
                ended.set()
            yield service_pb2.GenerateStreamResponse(event=convert.event(event))

    def WatchJob(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        owner = self._owner(context)
        if request.after_event_id and not _STREAM_ID.match(request.after_event_id):
            raise invalid_argument("after_event_id", "expected an event_id of this job's events")
        visible_record(self.ledger, request.job_id, owner)
        for event in self._events(request.job_id, request.after_event_id, context):
            yield service_pb2.WatchJobResponse(event=convert.event(event))

    # jobs and models

    def GetJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        owner = self._owner(context)
        record = visible_record(self.ledger, request.job_id, owner)
        pngs = None
        if request.include_images and record.result is not None:
            pngs = self.ledger.pngs(record.id, len(record.result.images))
        return service_pb2.GetJobResponse(job=convert.job(record, pngs))

    def CancelJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        owner = self._owner(context)
        record = visible_record(self.ledger, request.job_id, owner)
        if record.status in (JobStatus.succeeded, JobStatus.failed):
            raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, f"job {record.id} already {record.status.value}")
        if self.ledger.cancel(record.id) is JobStatus.cancelled and record.status is JobStatus.queued:
            self.state.metrics.jobs.labels(record.spec.model, "cancelled").inc()
        return service_pb2.CancelJobResponse(job=convert.job(visible_record(self.ledger, record.id, owner)))

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._owner(context)
        try:
            published = self.ledger.published_cards()
        except redis.RedisError:
            published = {}  # our own cards come from disk; only pickles' cards need Redis
        catalog = self.state.catalog
        return service_pb2.ListModelsResponse(default_model=catalog.default or "",
                                              models=[convert.model(m) for m in catalog.describe(published)])

    # helpers

    def _submit(self, spec_message: Any, owner: str, context: grpc.ServicerContext, preview_every: int = 0) -> str:
        body = convert.generate_request(spec_message)
        settings, ledger = self.state.settings, self.ledger
        spec = resolve_request(body, settings, ledger, self.state.catalog)
        idempotency_key = dict(context.invocation_metadata() or ()).get("idempotency-key")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= 255:
            raise invalid_argument("idempotency-key", "at most 255 characters")
        job_id, _ = admit(spec, owner, settings=settings, ledger=ledger, metrics=self.state.metrics,
                          idempotency_key=idempotency_key, body=body, preview_every=preview_every)
        return job_id

    def _wait(self, job_id: str, context: grpc.ServicerContext) -> JobStatus | None:
        """Until the job has ended (its status), is gone (None), or the call is over."""
        while context.is_active():
            if self.stopping.is_set():  # the job goes on: its caller can fetch it with GetJob
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"the gateway is shutting down; job {job_id} goes on "
                                 "(GetJob, WatchJob)")
            remaining = context.time_remaining()
            status = self.ledger.wait(job_id, 0.5 if remaining is None else max(0.0, min(0.5, remaining)))
            if status is None or status.terminal:
                return status
        return None

    def _events(self, job_id: str, after: str, context: grpc.ServicerContext) -> Iterator[JobEvent]:
        reader = EventReader(self.ledger, job_id, after=after, block_s=self.block_s)
        while context.is_active():
            if self.stopping.is_set():
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; resume with "
                                 f"WatchJob(job_id={job_id!r}, after_event_id=<the last event_id>)")
            yield from reader.poll()
            if reader.finished:
                return

    def _cancel_when_abandoned(self, job_id: str, context: grpc.ServicerContext) -> threading.Event:
        """Cancel the job if the call ends before it does; set the returned event once it has ended."""
        ended = threading.Event()

        def on_call_end() -> None:
            if ended.is_set() or self.stopping.is_set():
                return
            try:
                ledger = self.ledger
                before = ledger.status(job_id)
                if before is None or before.terminal:
                    return
                if ledger.cancel(job_id) is JobStatus.cancelled and before is JobStatus.queued:
                    model = ledger.conn.hget(Keys.job(job_id), "model")
                    self.state.metrics.jobs.labels(text(model), "cancelled").inc()
                log.info("job cancelled: its caller left", extra={"job_id": job_id})
            except (redis.RedisError, RpcFailure) as error:
                log.warning("could not cancel an abandoned job: %s", error, extra={"job_id": job_id})

        if not context.add_callback(on_call_end):
            on_call_end()
        return ended
