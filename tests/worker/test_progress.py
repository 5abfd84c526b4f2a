"""BatchObserver: rows back to jobs, cancellation drops rows, throttled progress, Redis errors skipped (no Redis)."""

from __future__ import annotations

from typing import Any

import redis
import torch

from model.generate import EvalEvent
from tests.worker.test_batcher import job
from worker.batcher import plan_batch
from worker.metrics import WorkerMetrics
from worker.progress import Aborted, BatchObserver


def event(nfe: int, rows: list[int]) -> EvalEvent:
    return EvalEvent(step=(nfe - 1) // 2, num_steps=18, sigma=1.0, nfe=nfe, nfe_total=35,
                     x0=torch.zeros(len(rows), 1, 8, 8), rows=rows)


def test_cancelled_job_rows_are_dropped_once_and_progress_is_per_job() -> None:
    a, b = job("a", 2), job("b", 3)
    b.done = 0
    batch = plan_batch([a, b], 8).batch
    reports: list[dict] = []
    heard: set[str] = set()

    def report(progress: dict) -> set[str]:
        reports.append(progress)
        return set()

    observer = BatchObserver(batch, report=report, cancelled=lambda: heard, aborted=lambda: False,
                             metrics=WorkerMetrics(), report_interval_s=0.0)
    assert list(observer.on_eval(event(1, [0, 1, 2, 3, 4]))) == []
    assert reports[-1]["a"] == {"step": 1, "num_steps": 18, "nfe_done": 2, "images_done": 0}
    assert reports[-1]["b"]["nfe_done"] == 3
    heard.add("b")
    assert list(observer.on_eval(event(2, [0, 1, 2, 3, 4]))) == [2, 3, 4]
    assert list(observer.on_eval(event(3, [0, 1]))) == []  # dropped once only
    assert "b" not in reports[-1] and reports[-1]["a"]["nfe_done"] == 6
    assert observer.dropped == {"b"}


def test_flag_from_redis_report_also_cancels_and_abort_raises() -> None:
    batch = plan_batch([job("a", 1), job("b", 1)], 8).batch
    stop = [False]
    observer = BatchObserver(batch, report=lambda progress: {"a"}, cancelled=set, aborted=lambda: stop[0],
                             metrics=WorkerMetrics(), report_interval_s=0.0)
    assert list(observer.on_eval(event(1, [0, 1]))) == [0]
    stop[0] = True
    try:
        observer.on_eval(event(2, [1]))
    except Aborted:
        pass
    else:
        raise AssertionError("expected Aborted")


def test_redis_errors_in_progress_previews_and_events_are_skipped_and_cancellation_still_works() -> None:
    batch = plan_batch([job("a", 1), job("b", 1)], 8).batch
    metrics = WorkerMetrics()

    def down(*_: object) -> Any:
        raise redis.TimeoutError("Timeout reading from socket")

    observer = BatchObserver(batch, report=down, cancelled=lambda: {"b"}, aborted=lambda: False,
                             metrics=metrics, report_interval_s=0.0, publish=down, previews=down)
    assert list(observer.on_eval(event(1, [0, 1]))) == [1]  # b was heard of on the cancel channel
    assert list(observer.on_eval(event(2, [0]))) == []
    assert observer.dropped == {"b"}
    skipped = {(s.labels["write"], s.value) for s in metrics.skipped_writes.collect()[0].samples
               if s.name.endswith("_total")}
    assert skipped == {("progress", 2.0), ("events", 2.0)}  # previews are read after a report that worked
