"""edm.v1.GenerationService: the REST API's operations over gRPC, plus event streams (grpc.aio).

Each handler authenticates the call, then does what its REST twin does with the same code
(service/jobs.py, validation.py, the ledger): short Redis work runs on the gateway's bounded
thread pool, and waiting (Generate, GenerateStream, WatchJob) happens on the event hub
(service/events.py), holding no thread and no Redis connection. Streams count against
EDM_MAX_STREAMS and waiting Generate calls against EDM_MAX_WAITING (RESOURCE_EXHAUSTED beyond).

A Generate or GenerateStream call that ends before its job (the client cancelled, its deadline
passed) cancels the job unless the call carried an `idempotency-key`: a retry with that key then
finds the job still going, never one its own first attempt cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import redis

from contract.events import JobEvent
from contract.jobs import JobStatus
from service.events import EventHub, HubClosed
from service.grpc import convert
from service.grpc.auth import owner_of_call
from service.grpc.errors import RpcFailure, invalid_argument
from service.grpc.stubs import service_grpc, service_pb2
from service.jobs import abandon, admit, cancel, check_owner, resolve_request, visible_record
from service.ledger import Ledger
from service.loops import blocking
from service.validation import check_idempotency_key, known_job_id

log = logging.getLogger("service.grpc")
_STREAM_ID = re.compile(r"^\d+(-\d+)?$")


def _watch_response(event: JobEvent) -> Any:
    return service_pb2.WatchJobResponse(event=convert.event(event))


def _message_size(message: Any) -> int:
    return int(message.ByteSize())


class Servicer(service_grpc.GenerationServiceServicer):
    """Reads the gateway's app.state (settings, catalog, metrics, key_hashes, ledger, limits) like the
    routes; waits on `hub`, the event hub of the gRPC loop."""

    def __init__(self, state: Any, *, hub: EventHub, stopping: asyncio.Event):
        self.state = state
        self.hub = hub
        self.stopping = stopping  # set while the server shuts down: streams end, jobs go on
        self._abandoning: set[asyncio.Task[Any]] = set()

    @property
    def ledger(self) -> Ledger:
        ledger: Ledger | None = self.state.ledger
        if ledger is None:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "the gateway is starting or stopping")
        return ledger

    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        return owner_of_call(context.invocation_metadata(), self.state.key_hashes)

    # generation

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        owner = self._owner(context)
        with self.state.waiting.take():
            job_id, keyed = await self._submit(request.spec, owner, context)
            ended = self._abandon_unless_ended(job_id, keyed, context)
            await self._wait_end(job_id)
            ended.set()
        ledger = self.ledger
        record = await blocking(lambda: visible_record(ledger, job_id, owner))
        if record.status is JobStatus.succeeded and record.result is not None:
            count = len(record.result.images)
            pngs = await blocking(lambda: ledger.pngs(job_id, count))
            if any(png is None for png in pngs):
                raise RpcFailure(grpc.StatusCode.NOT_FOUND, f"the images of job {job_id} have expired")
            self.state.metrics.generate_seconds.labels(record.spec.model).observe(time.perf_counter() - started)
            message = convert.job(record, pngs)
            return service_pb2.GenerateResponse(job_id=job_id, model=record.spec.model, images=message.images,
                                                timings=message.timings)
        if record.status is JobStatus.cancelled:
            raise RpcFailure(grpc.StatusCode.ABORTED, f"job {job_id} was cancelled")
        raise RpcFailure(grpc.StatusCode.INTERNAL, f"generation failed: {record.error}")

    async def GenerateStream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        owner = self._owner(context)
        every = request.preview_every if request.HasField("preview_every") else 1
        with self.state.streams.take():
            job_id, keyed = await self._submit(request.spec, owner, context, preview_every=every)
            ended = self._abandon_unless_ended(job_id, keyed, context)
            async for event in self._events(job_id, ""):
                if event.terminal:
                    ended.set()
                yield service_pb2.GenerateStreamResponse(event=convert.event(event))  # one watcher per job

    async def WatchJob(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        owner = self._owner(context)
        if request.after_event_id and not _STREAM_ID.match(request.after_event_id):
            raise invalid_argument("after_event_id", "expected an event_id of this job's events")
        ledger = self.ledger
        await blocking(lambda: check_owner(ledger, known_job_id(request.job_id), owner))
        with self.state.streams.take():
            encodings = self.hub.encodings
            async for event in self._events(request.job_id, request.after_event_id):
                yield encodings.get("grpc-watch", event, _watch_response, _message_size)

    # jobs and models

    async def GetJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        owner, ledger = self._owner(context), self.ledger

        def get() -> Any:
            record = visible_record(ledger, known_job_id(request.job_id), owner)
            pngs = None
            if request.include_images and record.result is not None:
                pngs = ledger.pngs(record.id, len(record.result.images))
            return service_pb2.GetJobResponse(job=convert.job(record, pngs))

        return await blocking(get)

    async def CancelJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        owner, ledger, metrics = self._owner(context), self.ledger, self.state.metrics

        def cancel_and_view() -> Any:
            record = visible_record(ledger, known_job_id(request.job_id), owner)
            if record.status in (JobStatus.succeeded, JobStatus.failed):
                raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, f"job {record.id} already {record.status.value}")
            cancel(ledger, metrics, record.id, record.spec.model, record.status)
            return service_pb2.CancelJobResponse(job=convert.job(visible_record(ledger, record.id, owner)))

        return await blocking(cancel_and_view)

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._owner(context)
        ledger = self.ledger
        try:
            published = await blocking(ledger.published_cards)
        except redis.RedisError:
            published = {}  # our own cards come from disk; only pickles' cards need Redis
        catalog = self.state.catalog
        return service_pb2.ListModelsResponse(default_model=catalog.default or "",
                                              models=[convert.model(m) for m in catalog.describe(published)])

    # helpers

    async def _submit(self, spec_message: Any, owner: str, context: grpc.aio.ServicerContext,
                      preview_every: int = 0) -> tuple[str, bool]:
        """Admit the call's job; (job id, whether the call named it with an idempotency-key)."""
        body = convert.generate_request(spec_message)
        idempotency_key = check_idempotency_key(dict(context.invocation_metadata() or ()).get("idempotency-key"))
        settings, ledger, catalog, metrics = self.state.settings, self.ledger, self.state.catalog, self.state.metrics

        def submit() -> str:
            spec = resolve_request(body, settings, ledger, catalog)
            job_id, _ = admit(spec, owner, settings=settings, ledger=ledger, metrics=metrics,
                              idempotency_key=idempotency_key, body=body, preview_every=preview_every)
            return job_id

        return await blocking(submit), idempotency_key is not None

    async def _wait_end(self, job_id: str) -> None:
        """Until the job has ended; UNAVAILABLE when the gateway shuts down first (the job goes on)."""
        try:
            await self.hub.wait_end(job_id)
        except HubClosed:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"the gateway is shutting down; job {job_id} goes on "
                             "(GetJob, WatchJob)") from None

    async def _events(self, job_id: str, after: str) -> AsyncIterator[JobEvent]:
        watcher = self.hub.watch(job_id, after=after)
        try:
            while not watcher.finished:
                for event in await watcher.next():
                    yield event
        except HubClosed:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; resume with "
                             f"WatchJob(job_id={job_id!r}, after_event_id=<the last event_id>)") from None
        finally:
            watcher.close()

    def _abandon_unless_ended(self, job_id: str, keyed: bool, context: grpc.aio.ServicerContext) -> asyncio.Event:
        """Cancel the job if the call ends before the job does (unless it is keyed, or the gateway is
        stopping); set the returned event once the job has ended."""
        ended = asyncio.Event()
        if keyed:
            return ended
        ledger, metrics, loop = self.ledger, self.state.metrics, asyncio.get_running_loop()

        def abandon_now() -> None:
            if ended.is_set() or self.stopping.is_set():
                return
            task = loop.create_task(self._abandon(ledger, metrics, job_id))
            self._abandoning.add(task)  # keep a reference until it has run
            task.add_done_callback(self._abandoning.discard)

        context.add_done_callback(lambda _: loop.call_soon_threadsafe(abandon_now))
        return ended

    @staticmethod
    async def _abandon(ledger: Ledger, metrics: Any, job_id: str) -> None:
        try:
            await blocking(lambda: abandon(ledger, metrics, job_id))
        except redis.RedisError as error:
            log.warning("could not cancel an abandoned job: %s", error, extra={"job_id": job_id})
