"""A real worker keeps a job's event stream within EDM_EVENT_STREAM_BYTES although the job asked for
x0 previews of every image at every evaluation: previews stop first, then progress events, and the
stream still holds the started event, every image event and the terminal event. Both schedulers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.events import events_key, stream_limits
from contract.jobs import JobSpec, JobStatus, SamplerParams
from contract.ledger import Keys
from service.ledger import Ledger
from tests.integration.servers import RedisServer, spawn_worker, stack_env, wait_until, wait_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BOUND = 64 << 10


@pytest.mark.parametrize("scheduler", ["step", "request"])
def test_previews_of_every_evaluation_stay_within_the_streams_bound(
        redis_server: RedisServer, tiny_model: Path, tmp_path: Path, scheduler: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    conn = redis_server.client()
    conn.flushdb()
    env = stack_env(redis_server.url, {"tiny": tiny_model}, EDM_SCHEDULER=scheduler, EDM_EVENT_STREAM_BYTES=BOUND)
    worker = spawn_worker(env, tmp_path / "worker.log")
    ledger = Ledger(conn, result_ttl_s=600, failure_ttl_s=600)
    try:
        wait_worker(worker, conn)
        images, steps = 8, 100
        spec = JobSpec(model="tiny", seeds=list(range(images)), class_labels=[None] * images,
                       sampler=SamplerParams(num_steps=steps, solver="heun"))
        job_id = ledger.submit(spec, "o", preview_every=1)[0]
        wait_until(lambda: ledger.status(job_id) is JobStatus.succeeded, 120, worker)

        entries = conn.xrange(events_key(job_id))
        size = sum(len(k) + len(v) for _, fields in entries for k, v in fields.items())
        assert size == int(conn.hget(Keys.job(job_id), "event_bytes") or 0) <= BOUND
        kinds = [fields[b"type"].decode() for _, fields in entries]
        assert kinds[0] == "started" and kinds[-1] == "done" and "error" not in kinds
        assert sorted(json.loads(fields[b"data"])["index"] for _, fields in entries
                      if fields[b"type"] == b"image") == list(range(images))
        with_previews = [k for k, (_, fields) in enumerate(entries) if any(name.startswith(b"f:") for name in fields)]
        previews_limit, progress_limit = stream_limits(BOUND)
        frames = sum(len(v) for _, fields in entries for k, v in fields.items() if k.startswith(b"f:"))
        assert with_previews and with_previews[0] == 1 and frames <= previews_limit
        assert len(with_previews) < kinds.count("progress") < 2 * steps - 1  # previews stopped, then progress
        assert all(ledger.pngs(job_id, images))
        memory = conn.memory_usage(events_key(job_id), samples=0)
        assert memory is not None and memory <= 1.3 * BOUND  # Redis's own overhead per entry comes on top
        with capsys.disabled():
            print(f"\n[{scheduler}: {images} images x {2 * steps - 1} evaluations with previews: stream "
                  f"{size} bytes ({memory} in Redis) within {BOUND}; {len(with_previews)} events with previews, "
                  f"{kinds.count('progress')} progress, {kinds.count('image')} image, 1 done]")
    finally:
        worker.stop()
        conn.close()
