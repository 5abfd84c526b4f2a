"""What happens after each network evaluation of a batch: progress, cancellation, metrics.

The engine calls `BatchObserver.on_eval` once per forward pass. It maps the batch's active rows
back to their jobs, drops the rows of cancelled jobs (they free their batch slot at the next
evaluation), reports progress to Redis at most every `report_interval_s`, and publishes one
progress event per job and evaluation to the job's event stream (service/events.py), with the
PNG of each of the job's rows' x0 estimate when the job asked for previews.

Those writes are best-effort: a Redis error skips them (logged, counted in edm_skipped_writes)
rather than failing the batch. Cancellation still works meanwhile: the cancel channel's ids come
from the listener thread, and the Redis flags are read again with the next report that succeeds.

Jobs whose writes Redis refused (`lost`: another worker holds them now, see worker/queue.py) leave
the batch like cancelled ones but are listed apart: they are neither stored nor ended here. A job
whose previews no longer fit in its event stream's bound gets no more previews.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

import redis

from contract.events import Frame
from model.generate import EvalEvent
from model.images import encode_png, to_pixels
from worker.batcher import Slice, batch_rows
from worker.metrics import WorkerMetrics

log = logging.getLogger("worker.progress")

# (job id, data, frames): a progress event, as `publish` appends it to the job's event stream.
Published = tuple[str, dict[str, Any], list[Frame]]
T = TypeVar("T")


class Aborted(Exception):
    """The worker was told to stop now: the batch is abandoned (and its jobs requeued)."""


class BatchObserver:
    def __init__(self, batch: list[Slice], *, report: Callable[[dict[str, dict[str, Any]]], set[str]],
                 cancelled: Callable[[], set[str]], aborted: Callable[[], bool], metrics: WorkerMetrics,
                 report_interval_s: float = 0.1,
                 publish: Callable[[list[Published]], Collection[str] | None] | None = None,
                 previews: Callable[[list[str]], dict[str, int]] | None = None,
                 lost: Callable[[], set[str]] = set):
        self.batch = batch
        self.row_slice = batch_rows(batch)
        self.first_row = [sum(piece.size for piece in batch[:k]) for k in range(len(batch))]
        self.publish = publish          # appends events to the jobs' streams; returns ids out of preview room
        self.no_previews: set[str] = set()
        self.lost = lost                # ids whose writes Redis refused (held by another worker now)
        self.lost_ids: set[str] = set()  # of this batch's jobs: dropped, neither stored nor ended here
        self.previews = previews        # job id -> k (x0 previews every k-th evaluation; 0 none)
        self.preview_every: dict[str, int] = {}
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
        self.metrics.pass_rows.labels(self.model).observe(len(ev.rows))
        self.metrics.passes.labels(self.model).inc()
        self.metrics.pass_seconds.labels(self.model).observe(now - self._last_eval)
        self.metrics.nfe.labels(self.model).inc(len(ev.rows))
        self._last_eval = now
        flagged = set(self.cancelled())
        if now - self._last_report >= self.report_interval_s or ev.nfe == ev.nfe_total:
            self._last_report = now
            reported = self._best_effort("progress", self.report, self.progress(ev))
            if reported is not None:
                flagged |= reported
                if self.previews is not None:  # re-read: the gateway may set it just after the job was queued
                    every = self._best_effort("previews", self.previews, [piece.job.id for piece in self.batch])
                    if every is not None:
                        self.preview_every = every
        ids = {self.batch[self.row_slice[row]].job.id for row in ev.rows}
        lost = (self.lost() & ids) - self.dropped
        self.lost_ids |= lost
        newly = ((flagged & ids) - self.dropped) | lost
        self.dropped |= newly
        self.publish_frames(ev)
        return [row for row in ev.rows if self.batch[self.row_slice[row]].job.id in newly]

    def _best_effort(self, write: str, call: Callable[[Any], T], arg: Any) -> T | None:
        """call(arg), or None when Redis fails (logged and counted; the batch goes on)."""
        try:
            return call(arg)
        except redis.RedisError as error:
            self.metrics.skipped_writes.labels(write).inc()
            log.warning("skipped a %s write: Redis failed (%s)", write, error)
            return None

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
        """One progress event per job still running; ev.x0[i] is the estimate of batch row ev.rows[i]."""
        if self.publish is None:
            return
        positions: dict[int, list[int]] = {}  # slice -> positions in ev.rows
        for position, row in enumerate(ev.rows):
            positions.setdefault(self.row_slice[row], []).append(position)
        events: list[Published] = []
        for k, where in positions.items():
            piece = self.batch[k]
            if piece.job.id in self.dropped:
                continue
            data = {"step": ev.step + 1, "num_steps": ev.num_steps, "sigma": ev.sigma, "nfe": ev.nfe,
                    "nfe_total": ev.nfe_total, "images_done": piece.start}
            frames: list[Frame] = []
            every = 0 if piece.job.id in self.no_previews else self.preview_every.get(piece.job.id, 0)
            if every > 0 and (ev.nfe % every == 0 or ev.nfe == ev.nfe_total):
                pixels = to_pixels(ev.x0[where])
                frames = [Frame(piece.start + ev.rows[p] - self.first_row[k], encode_png(pixels[i]))
                          for i, p in enumerate(where)]
            events.append((piece.job.id, data, frames))
        if events:
            spent = self._best_effort("events", self.publish, events)
            self.no_previews |= set(spent or ())

