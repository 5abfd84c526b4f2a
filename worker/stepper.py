"""The step scheduler (EDM_SCHEDULER=step, the default): continuous batching of network evaluations.

Every model this worker serves has a slot table (model/slots.py): each row is one image at its own
step of its own sampler, and each forward pass carries images of every job in flight, whatever their
settings. One turn of the loop:

1. cancelled jobs leave their rows;
2. the jobs claimed during the last pass are taken in;
3. waiting images enter free rows (admission, below);
4. while the tables have room for more images, a claim starts on a thread of its own (no fill
   window): it waits (about one and a half passes) for the next job and takes what else is queued,
   handing jobs over as they come, so its Redis round trips run beside the forward pass, not before it;
5. one forward pass of one model's table (models with work take turns, one pass each);
6. finished images, progress and terminal states go to the writer thread (worker/writer.py): the
   loop does not wait for PNG encoding or Redis.

Admission is first come, first served by claim order, in cohorts of at most EDM_COHORT_ROWS images
of one job, one cohort per job per round so that every waiting job gets rows. A job holds at most
EDM_MAX_PASS_ROWS rows at a time, so no job fills a table that other jobs are waiting for. When the
table holds more images than a pass carries, each pass gives every job an equal share of the pass
(model/slots.py): a job with at most EDM_MAX_PASS_ROWS / (jobs in the table) images is evaluated on
every pass, so a one-image request behind a 256-image job finishes in its own NFE passes.

Progress of a job whose images are at different points: `nfe` in the job's record counts network
evaluations summed over its images (finished ones included), out of images x NFE per image. A
progress event describes the job's least advanced image still in the sampler (its step, sigma and
evaluations so far, out of the NFE of one image) and counts the finished images; it carries x0
previews of the images that the pass evaluated.

Images are stored as soon as they finish; the job ends with its last image. A rerun after a worker
death skips the images already stored. The first SIGTERM drains: nothing new is claimed or
admitted, jobs with no image in a table go back to their queues at once, the images in the tables
finish, then partly done jobs go back (a rerun does only their missing images). A second signal
gives everything back at once. A main loop that stops completing passes while it holds work for
EDM_HANG_TIMEOUT_S stops heartbeating (its jobs are rerun elsewhere) and exits if it ever returns.

A job whose writes Redis refuses (its claim moved on to another worker while this one was paused or
cut off: worker/queue.py) leaves its rows at the next turn, neither failed nor given back. Once a
job's x0 previews no longer fit in its event stream's bound, none are made for it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
import torch

from contract import logs
from contract.events import Frame
from contract.jobs import ImageInfo, JobResult, JobStatus
from contract.ledger import Outcome
from model.generate import GeneratedImage
from model.images import encode_png, to_pixels
from model.samplers import SamplerSettings
from model.slots import CohortEvaluation, FinishedImage, PassReport, SlotEngine
from worker.batcher import Claimed
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.queue import WorkerQueue
from worker.runner import State, Worker
from worker.writer import Writer

log = logging.getLogger("worker.stepper")

# nfe_per_s (the heartbeat's, for the gateway's Retry-After) is the rate over about this much of the
# latest busy time, the loop's work between passes included: how fast this worker drains the queue.
RATE_WINDOW_S = 10.0


@dataclass
class Flight:
    """A claimed job on this worker: which of its images wait, run, or are stored."""

    job: Claimed
    claimed_at: float
    todo: list[int]                    # image indices not admitted yet, in order
    stored: dict[int, ImageInfo]       # finished (here or by an earlier run), by index
    settings: SamplerSettings
    admitted_at: float | None = None   # when its first image entered a table (this run)
    nfe_before: int = 0                # evaluations of the images an earlier run stored
    nfe_done: int = 0                  # evaluations of its images in this run
    where: dict[int, tuple[int, float, int]] = field(default_factory=dict)  # cohort id -> (step, sigma, nfe)
    previews_every: int = 0
    failed: bool = False

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def finished(self) -> bool:
        return len(self.stored) == self.job.spec.num_images


class StepWorker(Worker):
    def __init__(self, *, queue: WorkerQueue, engine: Engine, metrics: WorkerMetrics, slot_rows: int,
                 cohort_rows: int, heartbeat_interval_s: float, hang_timeout_s: float = 120.0,
                 block_s: float = 1.0, report_interval_s: float = 0.1,
                 connect: Callable[[], redis.Redis] | None = None, device: str = "cpu", dtype: str = "auto"):
        super().__init__(queue=queue, engine=engine, metrics=metrics, max_batch=engine.max_pass_rows,
                         max_wait_s=0.0, heartbeat_interval_s=heartbeat_interval_s, block_s=block_s,
                         connect=connect, device=device, dtype=dtype)
        self.tables: dict[str, SlotEngine] = {name: engine.table(name, slot_rows) for name in engine.models}
        self.cohort_rows = cohort_rows
        self.hang_timeout_s = hang_timeout_s
        self.report_interval_s = report_interval_s
        self.flights: dict[str, Flight] = {}  # claim order
        self.writer = Writer(metrics)
        self.hung = False
        self.last_pass_at = time.monotonic()
        self._turn = 0
        self._last_report = 0.0
        self._cohort_seq = 0
        self._flagged: set[str] = set()  # cancellation flags read by the writer's progress reports
        self._rate_nfe = self._rate_s = 0.0  # evaluations and busy seconds, decayed over RATE_WINDOW_S
        self._rate_mark: float | None = None  # end of the last pass, unless the worker was idle since
        self._claimer = ThreadPoolExecutor(1, thread_name_prefix="claim")
        self._claiming: Future[None] | None = None  # the claim that runs during the pass
        self._claimed: list[Claimed] = []  # what it has claimed so far (guarded by _claimed_lock)
        self._claimed_lock = threading.Lock()
        self._last_pass_s = 0.0

    # lifecycle

    def run(self) -> int:
        self.writer.start()
        try:
            return super().run()
        finally:
            self.writer.stop()
            self._claimer.shutdown(wait=True)

    def _should_exit(self) -> bool:
        if self.hung or self.stop_requests > 1:
            return True
        return bool(self.stop_requests) and not any(table.occupied for table in self.tables.values())

    def _exit_code(self) -> int:
        return 1 if self.hung else 0

    def _ending_ids(self) -> set[str]:
        return super()._ending_ids() | self.writer.ending()

    def _give_back(self) -> None:
        """At exit: what the writer holds is written first; then every claimed id not ended goes back."""
        if not self.hung:
            self.writer.flush(timeout_s=30.0)
        self._settle_claim()  # what it claimed is in the claimed list: retire() gives it back
        for table in self.tables.values():
            for group in table.groups():
                table.cancel(group)
        self.flights = {}
        super()._give_back()

    def _recover(self, error: Exception) -> None:
        self._settle_claim()
        for table in self.tables.values():
            for group in table.groups():
                table.cancel(group)
        self.flights = {}
        super()._recover(error)

    def _hung(self) -> bool:
        holding = any(table.occupied for table in self.tables.values())
        if holding and time.monotonic() - self.last_pass_at > self.hang_timeout_s:
            if not self.hung:
                self.hung = True
                self.metrics.hung.set(1)
                log.error("no forward pass completed for %.0f s while holding work: stopping the heartbeat so "
                          "that other workers rerun this worker's jobs", self.hang_timeout_s)
                try:
                    self.queue.stop_heartbeat()
                except redis.RedisError:
                    pass  # the key expires by itself
            return True
        return False

    # one turn

    def step(self) -> None:
        self._write_pending()
        self._drop_lost()
        self._cancel_flagged()
        draining = bool(self.stop_requests)
        if draining:
            self._adopt(self._settle_claim())
            self._give_back_unstarted()
        else:
            self._claim()
            self._admit()
        if not any(table.occupied for table in self.tables.values()):
            self.state = State.idle
            self._set_busy(0)
            self.last_pass_at = time.monotonic()  # idle is not hung: the clock starts with the next work
            self._rate_mark = None  # waiting for work is not part of the rate
            if not self.flights and not draining:
                self._adopt(self._settle_claim())
                if not self.flights:
                    self._reconcile()
                    self._adopt(self._wait_for_work())
            return
        self.state = State.busy
        if not draining:
            self._start_claim()
        self._pass()

    # claims: the Redis round trips run on a thread of their own while the pass runs

    def _claim(self) -> None:
        """Take in the jobs that the claim running beside the passes has brought so far."""
        try:
            if self._claiming is not None and self._claiming.done():
                claiming, self._claiming = self._claiming, None
                claiming.result()  # a RedisError reaches the main loop, as a claim of its own would
        finally:
            self._adopt(self._take_claimed())

    def _take_claimed(self) -> list[Claimed]:
        with self._claimed_lock:
            claimed, self._claimed = self._claimed, []
        return claimed

    def _settle_claim(self) -> list[Claimed]:
        """Wait for the claim in flight (at most about one and a half passes) and return what it brought."""
        claiming, self._claiming = self._claiming, None
        if claiming is not None:
            try:
                claiming.result()
            except Exception as error:  # the ids it moved, if any, stay in the claimed list: reconciled later
                log.warning("a claim failed: %s: %s", type(error).__name__, error)
        return self._take_claimed()

    def _start_claim(self) -> None:
        """Claim, beside the pass about to run, jobs while a table has more free rows than the claimed jobs
        that have no row yet can take: a job already running never keeps a newer one from being claimed
        (and sharing the rows it frees)."""
        if self._claiming is not None:
            return
        cap = self.engine.max_pass_rows
        wanted: dict[str, int] = {}
        models = list(self.tables)
        for model in models[self._turn % len(models):] + models[:self._turn % len(models)]:  # who waits: in turn
            table = self.tables[model]
            running = table.rows_by_group()
            waiting = sum(min(len(f.todo), cap) for f in self.flights.values()
                          if f.job.spec.model == model and f.id not in running)
            room = table.free_rows - waiting
            if room > 0:
                wanted[model] = room
        if wanted:
            # Through this pass and half the next (the next pass starts none; the one after does): a job
            # that arrives meanwhile enters right after the pass it arrived in. Ending within the pass
            # instead starts a claim every pass: a lone image's passes took 3 % longer (measured).
            deadline = time.monotonic() + min(self.block_s, max(0.005, 1.5 * self._last_pass_s))
            self._claiming = self._claimer.submit(self._claim_jobs, wanted, deadline)

    def _claim_jobs(self, wanted: dict[str, int], deadline: float) -> None:
        """In the claim thread: up to `wanted` jobs per model, handed to the loop as they come
        (`_claimed`). While rows are wanted and the deadline has not passed: wait (BLMOVE, at once
        when one is queued) for a job of the first model that wants rows, then take what else is
        queued (16 per round trip). With an empty queue that is one round trip per claim."""
        cap = self.engine.max_pass_rows
        room = dict(wanted)

        def took(model: str, jobs: list[Claimed]) -> None:
            room[model] -= sum(min(job.spec.num_images, cap) for job in jobs)
            with self._claimed_lock:
                self._claimed += jobs

        def sweep(model: str) -> None:
            while room[model] > 0:
                asked = min(room[model], 16)
                more = self.queue.claim(model, asked)
                took(model, more)
                if len(more) < asked:
                    return

        for model in list(room)[1:]:  # the first is claimed by the wait below
            sweep(model)
        while True:
            open_rooms = [model for model, free in room.items() if free > 0]
            left_s = deadline - time.monotonic()
            if not open_rooms or left_s < 0.002:
                return
            model = open_rooms[0]
            got = self.queue.claim_blocking(model, left_s)
            took(model, got)
            if got:
                sweep(model)

    def _adopt(self, claimed: list[Claimed]) -> None:
        now = time.time()
        if not claimed:
            return
        for job in claimed:
            problem = self.engine.check(job.spec)
            if problem is not None:
                self._end([(job, Outcome(job.id, JobStatus.failed, error=problem))])
                continue
            stored = dict(job.stored)
            settings = SamplerSettings(**job.spec.sampler.settings_kwargs())
            flight = Flight(job, now, [k for k in range(job.spec.num_images) if k not in stored], stored, settings,
                            nfe_before=len(stored) * job.spec.sampler.nfe_per_image)
            flight.previews_every = job.preview_every
            self.flights[job.id] = flight
            if stored:
                log.info("resuming a job: %d of %d images already stored", len(stored), job.spec.num_images,
                         extra={"job_id": job.id})
            if flight.finished:  # every image was stored by a run that died before the terminal write
                self._succeed(flight)

    def _admit(self) -> None:
        """Free rows go to waiting images: each round, in claim order, every waiting job gets up to
        EDM_COHORT_ROWS rows (never more than EDM_MAX_PASS_ROWS in all); the pieces of a round that
        share their settings enter as one cohort (one sampler coroutine for all their rows)."""
        cap = self.engine.max_pass_rows
        for model, table in self.tables.items():
            waiting = [f for f in self.flights.values() if f.todo and f.job.spec.model == model and not f.failed]
            while waiting and table.free_rows:
                free = table.free_rows
                rows = table.rows_by_group()
                by_settings: dict[SamplerSettings, list[tuple[Flight, list[int]]]] = {}
                for flight in waiting:
                    room = min(free, self.cohort_rows, cap - rows.get(flight.id, 0))
                    if room > 0:
                        by_settings.setdefault(flight.settings, []).append((flight, flight.todo[:room]))
                        free -= min(room, len(flight.todo))
                if not by_settings:
                    break
                for pieces in by_settings.values():
                    while pieces:  # a cohort carries at most one pass of rows
                        cohort, size = [], 0
                        while pieces and size + len(pieces[0][1]) <= cap:
                            size += len(pieces[0][1])
                            cohort.append(pieces.pop(0))
                        self._admit_cohort(table, cohort or [pieces.pop(0)])
                waiting = [f for f in waiting if f.todo and not f.failed]

    def _admit_cohort(self, table: SlotEngine, pieces: list[tuple[Flight, list[int]]]) -> None:
        self._cohort_seq += 1
        groups, keys, seeds, labels = [], [], [], []
        for flight, indices in pieces:
            spec = flight.job.spec
            groups += [flight.id] * len(indices)
            keys += [(self._cohort_seq, k) for k in indices]
            seeds += [spec.seeds[k] for k in indices]
            labels += [spec.class_labels[k] for k in indices]
        try:
            table.admit_rows(groups, keys, seeds, labels, pieces[0][0].settings)
        except (ValueError, ArithmeticError) as error:  # settings the sampler cannot compute
            for flight, _ in pieces:
                self._fail(flight, f"{type(error).__name__}: {error}")
            return
        now = time.time()
        for flight, indices in pieces:
            del flight.todo[:len(indices)]
            if flight.admitted_at is None:
                flight.admitted_at = now
                flight.job.started = True
                self.writer.must("started", self.queue.mark_started_many, flight.job)
                model = flight.job.spec.model
                self.metrics.admission_wait.labels(model).observe(now - flight.claimed_at)
                self.metrics.queue_wait.labels(model).observe(max(0.0, now - flight.job.created_at))

    def _pass(self) -> None:
        busy = [model for model, table in self.tables.items() if table.occupied]
        model = busy[self._turn % len(busy)]
        self._turn += 1
        table = self.tables[model]
        self._set_busy(sum(t.occupied for t in self.tables.values()))
        started = time.perf_counter()
        with_ids = logs.job_id.set(",".join(map(str, table.groups())))
        try:
            report = table.step()
        finally:
            logs.job_id.reset(with_ids)
        elapsed = time.perf_counter() - started
        self._last_pass_s = elapsed
        if self.hung:
            return  # our jobs are being rerun elsewhere: write nothing more
        self.last_pass_at = time.monotonic()
        self._observe(model, report, elapsed)
        for group, error in report.failed.items():
            flight = self.flights.get(str(group))
            if flight is not None:
                self._fail(flight, f"{type(error).__name__}: {error}")
        self._progress(report)
        self._store_images(report.finished)

    def _observe(self, model: str, report: PassReport, elapsed: float) -> None:
        if not report.rows_used:
            return
        self.metrics.passes.labels(model).inc()
        self.metrics.pass_rows.labels(model).observe(report.rows_used)
        self.metrics.padded_rows.labels(model).inc(report.rows_padded)
        self.metrics.pass_seconds.labels(model).observe(elapsed)
        self.metrics.nfe.labels(model).inc(report.rows_used)
        now = time.perf_counter()
        busy_s = elapsed if self._rate_mark is None else now - self._rate_mark
        self._rate_mark = now
        decay = math.exp(-busy_s / RATE_WINDOW_S)
        self._rate_nfe = self._rate_nfe * decay + report.rows_used
        self._rate_s = self._rate_s * decay + busy_s
        self.nfe_per_s = self._rate_nfe / max(self._rate_s, 1e-9)

    # results

    def _store_images(self, finished: list[FinishedImage]) -> None:
        by_job: dict[str, list[FinishedImage]] = {}
        for image in finished:
            by_job.setdefault(str(image.group), []).append(image)
        for job_id, images in by_job.items():
            flight = self.flights.get(job_id)
            if flight is None or flight.failed:
                continue
            infos: list[tuple[int, GeneratedImage]] = []
            for image in images:
                index: int = image.key[1]  # type: ignore[index]
                generated = GeneratedImage(image.seed, image.class_label, image.pixels)
                infos.append((index, generated))
                flight.stored[index] = ImageInfo(index=index, seed=image.seed, class_label=image.class_label,
                                                 metadata={})  # the writer fills in the metadata
            self.metrics.images.labels(flight.job.spec.model).inc(len(images))
            self.writer.must("images", self._write_images, (flight, infos))
            if flight.finished:
                self._succeed(flight)

    def _write_images(self, items: list[tuple[Flight, list[tuple[int, GeneratedImage]]]]) -> None:
        """In the writer: PNGs with metadata, then every job's images in one script call (atomic, fenced)."""
        stores = []
        for flight, images in items:
            encoded = []
            for index, image in images:
                data, text = self.engine.encode(flight.job.spec, image)
                info = ImageInfo(index=index, seed=image.seed, class_label=image.class_label, metadata=text)
                flight.stored[index] = info
                encoded.append((info, data))
            stores.append((flight.id, encoded))
        self.queue.store_images(stores)

    def _succeed(self, flight: Flight) -> None:
        self.flights.pop(flight.id, None)
        elapsed = time.time() - (flight.admitted_at or time.time())
        self.metrics.sampling.labels(flight.job.spec.model).observe(elapsed)

        spec = flight.job.spec
        final = {"step": spec.sampler.num_steps, "num_steps": spec.sampler.num_steps, "nfe_done": spec.nfe_total,
                 "images_done": spec.num_images}
        self.writer.best_effort("progress", self._write_report, ({flight.id: final}, None))

        def outcome() -> Outcome:  # built in the writer: the images' metadata is filled in by then
            images = [flight.stored[k] for k in sorted(flight.stored)]
            return Outcome(flight.id, JobStatus.succeeded,
                           result=JobResult(images=images, worker=self.queue.id, sampling_s=elapsed))
        self._end_later(flight.job, outcome)

    def _fail(self, flight: Flight, reason: str) -> None:
        flight.failed = True
        self.flights.pop(flight.id, None)
        self.tables[flight.job.spec.model].cancel(flight.id)
        log.warning("job failed in the sampler: %s", reason, extra={"job_id": flight.id})
        self._end_later(flight.job, lambda: Outcome(flight.id, JobStatus.failed, error=reason[:1000]))

    def _end(self, ended: list[tuple[Claimed, Outcome]]) -> None:
        for job, outcome in ended:
            self.flights.pop(job.id, None)
            self._end_later(job, lambda outcome=outcome: outcome)  # type: ignore[misc]

    def _end_later(self, job: Claimed, outcome: Callable[[], Outcome]) -> None:
        """The job's terminal state, written by the writer after everything handed over before it."""
        self.writer.must("finish", self._write_finishes, (job, outcome), ending=[job.id])

    def _write_finishes(self, items: list[tuple[Claimed, Callable[[], Outcome]]]) -> None:
        """In the writer: the terminal states of many jobs in one transaction."""
        ended = [(job, outcome()) for job, outcome in items]
        self._record_written(ended, self.queue.finish([outcome for _, outcome in ended]))

    # cancellation, lost jobs and progress

    def _drop_lost(self) -> None:
        """Jobs whose writes Redis refused (logged there) leave their rows: another worker holds them now."""
        for job_id in self.queue.take_lost():
            self.cancels.discard(job_id)
            flight = self.flights.pop(job_id, None)
            if flight is not None:
                self.tables[flight.job.spec.model].cancel(job_id)

    def _cancel_flagged(self) -> None:
        flagged = (self.cancels.snapshot() | self._flagged) & set(self.flights)
        for job_id in flagged:
            flight = self.flights.pop(job_id)
            freed = self.tables[flight.job.spec.model].cancel(job_id)
            log.info("job cancelled; %d rows freed", freed, extra={"job_id": job_id})
            self._end_later(flight.job, lambda job_id=job_id: Outcome(job_id, JobStatus.cancelled))  # type: ignore[misc]

    def _progress(self, report: PassReport) -> None:
        """One progress event per job that this pass evaluated; the job records every report interval."""
        by_job: dict[str, list[CohortEvaluation]] = {}
        for ev in report.evaluated:
            by_job.setdefault(str(ev.group), []).append(ev)
        events: list[tuple[str, dict[str, Any], list[tuple[int, Any]]]] = []
        for job_id, evaluations in by_job.items():
            flight = self.flights.get(job_id)
            if flight is None:
                continue
            previews: list[tuple[int, Any]] = []
            for ev in evaluations:
                flight.nfe_done += len(ev.keys)
                cohort = ev.keys[0][0]  # type: ignore[index]
                if ev.nfe == ev.nfe_total:
                    flight.where.pop(cohort, None)
                else:
                    flight.where[cohort] = (ev.step, ev.sigma, ev.nfe)
                every = 0 if job_id in self.queue.spent else flight.previews_every
                if every > 0 and (ev.nfe % every == 0 or ev.nfe == ev.nfe_total):
                    previews += [(key[1], ev.x0[i]) for i, key in enumerate(ev.keys)]  # type: ignore[index]
            step, sigma, nfe = min(flight.where.values(), default=None, key=lambda w: w[2]) or (
                evaluations[-1].step, evaluations[-1].sigma, evaluations[-1].nfe)
            data = {"step": step + 1, "num_steps": flight.settings.num_steps, "sigma": sigma, "nfe": nfe,
                    "nfe_total": flight.job.spec.sampler.nfe_per_image, "images_done": len(flight.stored)}
            events.append((job_id, data, previews))
        if events:
            self.writer.best_effort("events", self._publish, *events)
        now = time.monotonic()
        if now - self._last_report >= self.report_interval_s:
            self._last_report = now
            self._report()

    def _publish(self, events: list[tuple[str, dict[str, Any], list[tuple[int, Any]]]]) -> None:
        """In the writer: x0 previews to PNG, then every job's event in one script call."""
        published = []
        for job_id, data, previews in events:
            pixels = to_pixels(torch.stack([x0 for _, x0 in previews])) if previews else ()
            frames = [Frame(index, encode_png(image)) for (index, _), image in zip(previews, pixels, strict=True)]
            published.append((job_id, data, frames))
        self.queue.publish_progress(published)

    def _report(self) -> None:
        """The job records' progress fields; the cancellation flags and preview settings come back."""
        fields = {}
        for flight in self.flights.values():
            if flight.admitted_at is None:
                continue
            step = min((w[0] for w in flight.where.values()), default=0)
            fields[flight.id] = {"step": step + 1, "num_steps": flight.settings.num_steps,
                                 "nfe_done": flight.nfe_before + flight.nfe_done, "images_done": len(flight.stored)}
        if not fields:
            return
        self.writer.best_effort("progress", self._write_report, (fields, dict(self.flights)))

    def _write_report(self, items: list[tuple[dict[str, dict[str, int]], dict[str, Flight] | None]]) -> None:
        """In the writer: progress fields into the job records; the cancellation flags (the pub/sub
        message may be lost) and, with the periodic report, the preview settings come back."""
        fields = {job_id: values for batch, _ in items for job_id, values in batch.items()}
        self._flagged, previews = self.queue.report_and_read(fields)
        flights = {job_id: flight for _, batch in items if batch for job_id, flight in batch.items()}
        for job_id, every in previews.items():
            if job_id in flights:
                flights[job_id].previews_every = every

    def _give_back_unstarted(self) -> None:
        """Draining: jobs with no image in a table go back to their queues now; the rest at exit."""
        unstarted = [f for f in self.flights.values() if f.admitted_at is None]
        if unstarted:
            self.queue.unclaim([f.job for f in unstarted])
            for flight in unstarted:
                self.flights.pop(flight.id, None)

