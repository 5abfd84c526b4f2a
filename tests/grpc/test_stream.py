"""GenerateStream, WatchJob and GET /v1/jobs/{id}/events over a real channel, gateway, worker and Redis."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from typing import Any

import numpy as np
import pytest

from model.images import decode_png, read_png_text
from service.grpc.stubs import job_pb2, service_pb2
from tests.grpc.conftest import RESOLUTION, Stack, kind, read_sse, spec, stream_request

pytestmark = [pytest.mark.integration]


def stored(events: list[Any]) -> list[Any]:
    """The events read from the job's stream (derived queue positions have no event_id)."""
    return [e for e in events if e.event_id]


@pytest.mark.parametrize(("solver", "evaluations"), [(job_pb2.SOLVER_UNSPECIFIED, lambda n: 2 * n - 1),
                                                     (job_pb2.SOLVER_EULER, lambda n: n)])
def test_one_progress_event_per_evaluation_then_images_equal_to_unary(stack: Stack, solver: int,
                                                                      evaluations: Any) -> None:
    steps = 6
    fields = dict(seeds=[5, 6], class_index=4, sampler={"num_steps": steps, "solver": solver})
    events = [r.event for r in stack.stub.GenerateStream(stream_request(**fields), timeout=60)]
    kinds = [kind(e) for e in events]
    while kinds[0] == "queued":
        kinds.pop(0)
    nfe = evaluations(steps)
    assert kinds == ["started"] + ["progress"] * nfe + ["image", "image", "done"], kinds
    assert len({e.job_id for e in events}) == 1
    ids = [tuple(map(int, e.event_id.split("-"))) for e in stored(events)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    progress = [e.progress for e in events if kind(e) == "progress"]
    assert [p.nfe for p in progress] == list(range(1, nfe + 1))
    assert {(p.nfe_total, p.num_steps, p.images_done) for p in progress} == {(nfe, steps, 0)}
    steps_seen = [(step, [p.sigma for p in group]) for step, group in groupby(progress, key=lambda p: p.step)]
    assert [step for step, _ in steps_seen] == list(range(1, steps + 1))
    for step, sigmas in steps_seen:  # Heun: at the step's noise level, then at the next (not in the last step)
        assert len(sigmas) == (2 if solver != job_pb2.SOLVER_EULER and step < steps else 1)
        assert all(a > b for a, b in zip(sigmas, sigmas[1:], strict=False)), (step, sigmas)
    firsts = [sigmas[0] for _, sigmas in steps_seen]
    assert all(a > b for a, b in zip(firsts, firsts[1:], strict=False))
    for p in progress:  # default: a preview of each image with every evaluation
        assert [f.index for f in p.frames] == [0, 1]
        for frame in p.frames:
            assert decode_png(frame.png).shape == (RESOLUTION, RESOLUTION, 1)

    streamed = {e.image.image.seed: e.image.image for e in events if kind(e) == "image"}
    unary = stack.stub.Generate(service_pb2.GenerateRequest(spec=spec(**fields)), timeout=60)
    assert [i.seed for i in unary.images] == [5, 6] and sorted(streamed) == [5, 6]
    for image in unary.images:
        np.testing.assert_array_equal(decode_png(streamed[image.seed].png), decode_png(image.png))
        assert streamed[image.seed].png == image.png  # metadata too: a pure function of the request
        assert read_png_text(image.png) == dict(image.metadata) and image.class_label == 4
    done = events[-1].done
    assert done.images == 2 and done.sampling_s > 0


def test_late_joiners_get_what_they_missed_and_every_watcher_the_same_events(stack: Stack) -> None:
    """A gRPC watcher and an SSE client join mid-job; a third reads it all after the end."""
    call = stack.stub.GenerateStream(stream_request(preview_every=5, seeds=[9], sampler={"num_steps": 40}),
                                     timeout=60)
    first = []
    for response in call:
        first.append(response.event)
        if len([e for e in first if kind(e) == "progress"]) == 6:
            break
    job_id = first[0].job_id

    def watch() -> list[Any]:
        return [r.event for r in stack.stub.WatchJob(service_pb2.WatchJobRequest(job_id=job_id), timeout=60)]

    def sse() -> list[dict[str, Any]]:
        with stack.http() as client, client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            return read_sse(response)

    with ThreadPoolExecutor(2) as pool:
        watched, streamed = pool.submit(watch), pool.submit(sse)
        original = first + [r.event for r in call]
        watched_events, sse_events = watched.result(timeout=60), streamed.result(timeout=60)
    assert kind(original[-1]) == "done"
    assert not any(e.HasField("queued") for e in watched_events)  # it joined after the queue
    assert [e.SerializeToString() for e in watched_events] == [e.SerializeToString() for e in stored(original)]

    after = [r.event for r in stack.stub.WatchJob(service_pb2.WatchJobRequest(job_id=job_id), timeout=60)]
    assert [e.SerializeToString() for e in after] == [e.SerializeToString() for e in stored(original)]
    middle = stored(original)[10].event_id
    resumed = [r.event for r in stack.stub.WatchJob(
        service_pb2.WatchJobRequest(job_id=job_id, after_event_id=middle), timeout=60)]
    assert [e.event_id for e in resumed] == [e.event_id for e in stored(original)[11:]]

    progress = [e.progress for e in original if kind(e) == "progress"]
    assert [p.nfe for p in progress if p.frames] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 79]
    assert_same_as_sse(stored(original), sse_events)


def assert_same_as_sse(grpc_events: list[Any], sse_events: list[dict[str, Any]]) -> None:
    assert [(s["id"], s["event"]) for s in sse_events] == [(e.event_id, kind(e)) for e in grpc_events]
    for event, s in zip(grpc_events, sse_events, strict=True):
        data = s["data"]
        assert data["job_id"] == event.job_id and data["type"] == s["event"] and data["event_id"] == s["id"]
        if kind(event) == "progress":
            p = event.progress
            assert (data["step"], data["num_steps"], data["sigma"], data["nfe"], data["nfe_total"]) == \
                (p.step, p.num_steps, p.sigma, p.nfe, p.nfe_total)
            assert [(f["index"], base64.b64decode(f["png_base64"])) for f in data["frames"]] == \
                [(f.index, f.png) for f in p.frames]
        elif kind(event) == "image":
            image = event.image.image
            assert (data["index"], data["seed"], data["class_label"]) == (image.index, image.seed, image.class_label)
            assert base64.b64decode(data["png_base64"]) == image.png and data["metadata"] == dict(image.metadata)
        elif kind(event) == "started":
            assert data["started_at"] == event.started.started_at and data["worker"] == event.started.worker


def test_sse_after_the_end_replays_then_a_reconnection_gets_204(stack: Stack) -> None:
    events = [r.event for r in stack.stub.GenerateStream(stream_request(seeds=[3], sampler={"num_steps": 3}),
                                                         timeout=60)]
    job_id = events[0].job_id
    with stack.http() as client:
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            replay = read_sse(response)
        assert_same_as_sse(stored(events), replay)
        middle = replay[2]["id"]
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": middle}) as response:
            assert [e["id"] for e in read_sse(response)] == [e["id"] for e in replay[3:]]
        last = replay[-1]["id"]
        assert client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": last}).status_code == 204
        bad = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 422 and bad.json()["field"] == "Last-Event-ID"
        assert client.get("/v1/jobs/nope/events").status_code == 404
