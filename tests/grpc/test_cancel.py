"""A call that ends before its job cancels it at the next network evaluation, and frees the worker."""

from __future__ import annotations

import statistics
import time

import grpc
import pytest

from service.grpc.stubs import job_pb2, service_pb2
from tests.grpc.conftest import Stack, kind, spec, stream_request
from tests.integration.servers import wait_until

pytestmark = [pytest.mark.integration]

BIG = dict(seeds=list(range(48)), sampler={"num_steps": 200})  # ~0.1 s per forward pass on one thread


def job_status(stack: Stack, job_id: str) -> int:
    return stack.stub.GetJob(service_pb2.GetJobRequest(job_id=job_id), timeout=10).job.status


def test_cancelling_the_stream_cancels_the_job_and_the_next_job_starts_within_a_forward_pass(
        stack: Stack, record_property: pytest.RecordProperty) -> None:
    call = stack.stub.GenerateStream(stream_request(preview_every=0, **BIG), timeout=120)
    arrivals: list[float] = []
    job_id = ""
    for response in call:
        job_id = response.event.job_id
        if kind(response.event) == "progress":
            arrivals.append(time.monotonic())
            if len(arrivals) == 6:
                break
    forward_s = statistics.median(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    # The next job waits in the queue behind the running one (other settings: it cannot join its batch).
    follower = stack.stub.GenerateStream(stream_request(preview_every=0, seeds=[1], sampler={"num_steps": 3}),
                                         timeout=120)
    follower_events = iter(follower)
    assert kind(next(follower_events).event) == "queued"

    cancelled_at = time.time()
    call.cancel()
    started = next(r.event for r in follower_events if kind(r.event) == "started")
    latency = started.started.started_at - cancelled_at
    record_property("forward_pass_s", round(forward_s, 4))
    record_property("cancel_to_next_start_s", round(latency, 4))
    print(f"forward pass {forward_s * 1000:.0f} ms; cancel -> next job started {latency * 1000:.0f} ms")
    assert latency < forward_s + 0.1, (latency, forward_s)  # the pass in flight, plus bookkeeping
    assert kind(list(follower_events)[-1].event) == "done"

    job = stack.stub.GetJob(service_pb2.GetJobRequest(job_id=job_id), timeout=10).job
    assert job.status == job_pb2.JOB_STATUS_CANCELLED
    assert 0 < job.progress.nfe < job.progress.nfe_total


def test_a_passed_deadline_cancels_the_job(stack: Stack) -> None:
    before = set(stack.conn.keys("edm:job:*"))
    with pytest.raises(grpc.RpcError) as raised:
        stack.stub.Generate(service_pb2.GenerateRequest(spec=spec(**BIG)), timeout=1.0)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (key,) = set(stack.conn.keys("edm:job:*")) - before
    job_id = key.decode().rsplit(":", 1)[1]
    wait_until(lambda: job_status(stack, job_id) == job_pb2.JOB_STATUS_CANCELLED, 5)


def test_cancel_job_of_a_running_job_ends_its_watchers_with_an_error_event(stack: Stack) -> None:
    call = stack.stub.GenerateStream(stream_request(preview_every=0, **BIG), timeout=120)
    events = iter(call)
    job_id = next(r.event for r in events if kind(r.event) == "progress").job_id
    watcher = stack.stub.WatchJob(service_pb2.WatchJobRequest(job_id=job_id), timeout=60)
    job = stack.stub.CancelJob(service_pb2.CancelJobRequest(job_id=job_id), timeout=10).job
    assert job.cancel_requested
    for stream in (events, iter(watcher)):
        last = [r.event for r in stream][-1]
        assert kind(last) == "error" and last.event_id
        assert last.error.status == job_pb2.JOB_STATUS_CANCELLED
    with pytest.raises(grpc.RpcError) as raised:
        stack.stub.CancelJob(service_pb2.CancelJobRequest(job_id="nope"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
