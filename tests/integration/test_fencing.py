"""Fencing with real processes: a worker paused (SIGSTOP) past its heartbeat TTL while a second worker
reruns its job, then resumed (SIGCONT), writes nothing more for that job. The stored PNGs and the
job's events after the takeover are exactly the rerun's, and the paused worker drops the job
without failing it. Both schedulers."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from contract.events import events_key
from contract.jobs import JobSpec, JobStatus, SamplerParams
from contract.ledger import Keys
from service.ledger import Ledger
from tests.integration.servers import RedisServer, spawn_worker, stack_env, wait_until, wait_worker, worker_id_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEEDS = [21, 22, 23, 24]


def spec(steps: int) -> JobSpec:
    return JobSpec(model="tiny", seeds=SEEDS, class_labels=[3] * len(SEEDS),
                   sampler=SamplerParams(num_steps=steps, solver="heun"))


@pytest.mark.parametrize("scheduler", ["step", "request"])
def test_a_paused_worker_that_lost_its_job_writes_nothing_more_for_it(
        redis_server: RedisServer, tiny_model: Path, tmp_path: Path, scheduler: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    conn = redis_server.client()
    conn.flushdb()
    env = stack_env(redis_server.url, {"tiny": tiny_model}, EDM_SCHEDULER=scheduler, EDM_HEARTBEAT_TTL_S=1,
                    EDM_HEARTBEAT_INTERVAL_S=0.2)
    workers = [spawn_worker(env, tmp_path / f"worker{k}.log") for k in range(2)]
    ledger = Ledger(conn, result_ttl_s=600, failure_ttl_s=600)
    paused = None
    try:
        for worker in workers:
            wait_worker(worker, conn)
        steps = 300
        reference = ledger.submit(spec(steps), "o")[0]
        wait_until(lambda: ledger.status(reference) is JobStatus.succeeded, 120)
        job_id = ledger.submit(spec(steps), "o", preview_every=1)[0]
        total = len(SEEDS) * (2 * steps - 1)
        wait_until(lambda: int(conn.hget(Keys.job(job_id), "nfe_done") or 0) > total // 4, 60, interval_s=0.01)
        holder = conn.hget(Keys.job(job_id), "holder").decode()
        paused = next(w for w in workers if worker_id_of(w, conn) == holder)
        survivor = next(w for w in workers if w is not paused)
        survivor_id = worker_id_of(survivor, conn)
        os.kill(paused.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # The survivor's reaper gives the job back once the heartbeat expires; the survivor reruns it.
        wait_until(lambda: conn.hget(Keys.job(job_id), "worker") == survivor_id.encode(), 30, interval_s=0.01)
        takeover_s = time.monotonic() - stopped_at
        os.kill(paused.pid, signal.SIGCONT)
        resumed = paused
        paused = None
        wait_until(lambda: "no longer holds the job" in resumed.output(), 30, resumed)
        wait_until(lambda: ledger.status(job_id) is JobStatus.succeeded, 120, survivor)
        time.sleep(0.5)  # whatever the resumed worker still had queued for the job has been tried by now

        record = ledger.record(job_id)
        assert record is not None and record.reruns == 1 and record.result is not None
        assert record.result.worker == survivor_id
        assert ledger.pngs(job_id, len(SEEDS)) == ledger.pngs(reference, len(SEEDS))

        stream = [(fields[b"type"].decode(), json.loads(fields[b"data"]), fields.get(b"claim", b"").decode())
                  for _, fields in conn.xrange(events_key(job_id))]
        starts = [k for k, (kind, _, _) in enumerate(stream) if kind == "started"]
        assert len(starts) == 2 and stream[starts[0]][1]["worker"] == holder
        assert stream[starts[1]][1]["worker"] == survivor_id
        first_claim, rerun_claim = stream[starts[0]][2], stream[starts[1]][2]
        assert first_claim and rerun_claim and first_claim != rerun_claim
        assert {claim for _, _, claim in stream[:starts[1]]} == {first_claim}
        assert {claim for _, _, claim in stream[starts[1]:]} == {rerun_claim}  # nothing from the paused worker
        kinds = [kind for kind, _, _ in stream]
        assert kinds.count("done") == 1 and kinds[-1] == "done" and "error" not in kinds
        assert sorted(data["index"] for kind, data, _ in stream if kind == "image") == list(range(len(SEEDS)))
        rerun_progress = [data["nfe"] for kind, data, _ in stream[starts[1]:] if kind == "progress"]
        assert rerun_progress[0] == 1 and rerun_progress[-1] == 2 * steps - 1

        assert resumed.alive()
        log = resumed.output()
        assert "job failed" not in log and "Traceback" not in log
        assert resumed.stop() == 0
        with capsys.disabled():
            print(f"\n[{scheduler}: SIGSTOP -> rerun started {takeover_s:.2f} s (heartbeat TTL 1 s); resumed worker "
                  f"refused and dropped the job; {len(stream)} events, {len(stream) - starts[1]} from the rerun]")
    finally:
        if paused is not None:
            os.kill(paused.pid, signal.SIGCONT)
        for worker in workers:
            if worker.alive():
                worker.stop()
        conn.close()
