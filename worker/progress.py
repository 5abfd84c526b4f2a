"""What happens after each network evaluation of a batch: progress, cancellation, metrics.

The engine calls `BatchObserver.on_eval` once per forward pass. It maps the batch's active rows
back to their jobs, drops the rows of cancelled jobs (they free their batch slot at the next
evaluation), and reports progress to Redis at most every `report_interval_s`. This is the one
place that sees every intermediate x0 estimate: streaming frames to a per-job Redis stream
belongs here too (see `publish_frames`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from model.generate import EvalEvent
from worker.batcher import Slice, batch_rows
from worker.metrics import WorkerMetrics


class Aborted(Exception):
    """The worker was told to stop now: the batch is abandoned (and its jobs requeued)."""


class BatchObserver:
    def __init__(self, batch: list[Slice], *, report: Callable[[dict[str, dict[str, Any]]], set[str]],
                 cancelled: Callable[[], set[str]], aborted: Callable[[], bool], metrics: WorkerMetrics,
                 report_interval_s: float = 0.1):
        self.batch = batch
        self.row_slice = batch_rows(batch)
        self.report = report            # writes progress, returns ids flagged for cancellation
        self.cancelled = cancelled      # ids whose cancellation this worker has heard of
        self.aborted = aborted
        self.metrics = metrics
        self.model = batch[0].job.spec.model
        self.report_interval_s = report_interval_s
        self.dropped: set[str] = set()
        self._last_report = 0.0
        self._last_eval = time.perf_counter()

    def on_eval(self, ev: EvalEvent) -> Iterable[int]:
        if self.aborted():
            raise Aborted
        now = time.perf_counter()
        self.metrics.forward_images.labels(self.model).observe(len(ev.rows))
        self.metrics.forward_seconds.labels(self.model).observe(now - self._last_eval)
        self.metrics.nfe.labels(self.model).inc(len(ev.rows))
        self._last_eval = now
        flagged = set(self.cancelled())
        if now - self._last_report >= self.report_interval_s or ev.nfe == ev.nfe_total:
            flagged |= self.report(self.progress(ev))
            self._last_report = now
        self.publish_frames(ev)
        ids = {self.batch[self.row_slice[row]].job.id for row in ev.rows}
        newly = (flagged & ids) - self.dropped
        self.dropped |= newly
        return [row for row in ev.rows if self.batch[self.row_slice[row]].job.id in newly]

    def progress(self, ev: EvalEvent) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for piece in self.batch:
            job = piece.job
            if job.id in self.dropped:
                continue
            per_image = ev.nfe_total
            done_before = job.done * per_image
            entry = out.setdefault(job.id, {"step": ev.step + 1, "num_steps": ev.num_steps,
                                            "nfe_done": done_before, "images_done": job.done})
            entry["nfe_done"] += piece.size * ev.nfe
        return out

    def publish_frames(self, ev: EvalEvent) -> None:
        """Hook for streaming: ev.x0[i] is the current estimate of batch row ev.rows[i]. A later
        change publishes these to per-job Redis streams for the jobs that asked for frames."""

