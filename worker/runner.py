"""The worker's main loop: claim, batch, sample, store; plus its heartbeat and cancel threads.

States: starting -> idle <-> busy -> draining -> stopped. The first SIGTERM/SIGINT drains (the
running batch finishes, claimed work not started is given back, then exit); a second one aborts
the batch and gives everything back.

A job whose writes Redis refuses (its claim moved on: this worker's heartbeat expired, during a long
pause or a partition, and the reaper gave the job to another worker) is dropped: it leaves the
batch and `held`, and nothing more is written for it, not even a failure (see worker/queue.py).
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import redis

from contract import logs
from contract.jobs import ImageInfo, JobResult, JobStatus, WorkerInfo
from contract.ledger import Keys, Outcome, text
from model.generate import GeneratedImage
from worker.batcher import Claimed, Slice, plan_batch
from worker.engine import Engine
from worker.metrics import WorkerMetrics
from worker.progress import Aborted, BatchObserver
from worker.queue import WorkerQueue

log = logging.getLogger("worker.runner")


class State(enum.StrEnum):
    starting = "starting"
    idle = "idle"
    busy = "busy"
    draining = "draining"
    stopped = "stopped"


class CancelListener(threading.Thread):
    """Collects job ids published on the cancel channel, so a batch can drop them at once."""

    def __init__(self, connect: Callable[[], redis.Redis], stop: threading.Event):
        super().__init__(name="cancel-listener", daemon=True)
        self.connect = connect
        self.stop = stop
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def snapshot(self) -> set[str]:
        with self._lock:
            return set(self._ids)

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._ids.discard(job_id)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                pubsub = self.connect().pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(Keys.CANCEL_CHANNEL)
                while not self.stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        with self._lock:
                            if len(self._ids) > 10_000:  # mostly ids held elsewhere; the Redis flag stays
                                self._ids.clear()
                            self._ids.add(text(message["data"]))
            except redis.RedisError as error:
                log.warning("cancel listener lost Redis: %s", error)
                self.stop.wait(1.0)


class Worker:
    def __init__(self, *, queue: WorkerQueue, engine: Engine, metrics: WorkerMetrics, max_batch: int,
                 max_wait_s: float, heartbeat_interval_s: float, batch_gap_s: float = 0.002, block_s: float = 1.0,
                 connect: Callable[[], redis.Redis] | None = None, device: str = "cpu", dtype: str = "auto"):
        self.queue = queue
        self.engine = engine
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batch_gap_s = batch_gap_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.block_s = block_s
        self.models = list(engine.models)
        self.state = State.starting
        self.held: list[Claimed] = []   # claimed and partly done (a job bigger than one batch)
        self.pending: list[tuple[Claimed, Outcome]] = []  # ended here, terminal state not yet written
        self.stop_requests = 0
        self.nfe_per_s = 0.0
        self._stop = threading.Event()
        self._info = WorkerInfo(id=queue.id, models=self.models, device=device, dtype=dtype, pid=os.getpid(),
                                host=socket.gethostname(), started_at=time.time())
        self.cancels = CancelListener(connect or (lambda: queue.conn), self._stop)
        self._next_model = 0

    # lifecycle

    def request_stop(self, *_: object) -> None:
        self.stop_requests += 1
        log.info("stop requested (%s)", "drain" if self.stop_requests == 1 else "abort")

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> int:
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        self.cancels.start()
        self.state = State.idle
        log.info("worker %s serving %s", self.queue.id, ", ".join(self.models))
        while not self._should_exit():
            try:
                self.step()
            except redis.RedisError as error:
                log.warning("redis unavailable: %s", error)
                time.sleep(1.0)
            except Exception as error:  # a bug or a job we did not foresee: keep serving
                log.exception("unexpected error in the main loop; giving the claimed jobs back")
                self._recover(error)
                time.sleep(1.0)
        self.state = State.draining
        self._stop.set()
        heartbeat.join(timeout=5.0)
        self._give_back()
        self.state = State.stopped
        log.info("worker %s stopped", self.queue.id)
        return self._exit_code()

    def _exit_code(self) -> int:
        return 0

    def _should_exit(self) -> bool:
        """The first stop request ends the loop: a batch runs to its end inside step()."""
        return self.stop_requests > 0

    def _ending_ids(self) -> set[str]:
        """Jobs ended here whose terminal state is not written yet: never give these back."""
        return {job.id for job, _ in self.pending}

    def _give_back(self) -> None:
        for attempt in range(10):
            try:
                self._write_pending()
                self.queue.retire()  # requeues every id still claimed, in claim order, known here or not
                self.held = []
                return
            except redis.RedisError as error:
                log.warning("cannot give back claimed jobs yet (%s); retrying", error)
                time.sleep(min(1.0 * (attempt + 1), 3.0))

    # one iteration

    def step(self) -> None:
        self._write_pending()  # before anything else: those jobs are done, only Redis does not know yet
        self._drop_lost()
        if not self.held:
            self._reconcile()
            self.held = self._wait_for_work()
            if not self.held:
                return
        self._fill(self.held[0].spec.model)
        if self.stop_requests:
            return  # draining: claimed work not started goes back to the queue
        plan = plan_batch(self.held, self.max_batch)
        give_back = [job for job in plan.deferred if not job.started]
        self.queue.unclaim(give_back)
        batch_jobs = {piece.job.id for piece in plan.batch}
        self.held = [job for job in self.held if job.id in batch_jobs or job.started]
        self.run_batch(plan.batch)

    def _recover(self, error: Exception) -> None:
        """After an unexpected error: every claimed job but those ended here goes back to its queue with
        a rerun counted, so that a job that keeps causing the error fails past EDM_MAX_RERUNS instead of
        looping. If Redis fails meanwhile, the next idle step gives back what is left (_reconcile)."""
        self.held = []
        self.state = State.idle
        reason = (f"the worker hit an error {self.queue.max_reruns + 1} times while holding it (EDM_MAX_RERUNS): "
                  f"{type(error).__name__}: {error}")
        try:
            given = self.queue.give_back_all(exclude=self._ending_ids(), count_rerun=True,
                                             failure=reason)
        except redis.RedisError as redis_error:
            log.warning("cannot give the claimed jobs back yet: %s", redis_error)
            return
        for job_id, outcome in given:
            self.cancels.discard(job_id)
            log.warning("job %s after an unexpected error", outcome, extra={"job_id": job_id})
            model = self.queue.model_of(job_id) if outcome == "failed" else None
            if model is not None:
                self.metrics.jobs.labels(model, "failed").inc()

    def _drop_lost(self) -> None:
        """Forget the jobs whose writes Redis refused (logged there): another worker holds them now."""
        lost = self.queue.take_lost()
        if lost:
            self.held = [job for job in self.held if job.id not in lost]
            self.pending = [(job, outcome) for job, outcome in self.pending if job.id not in lost]
            for job_id in lost:
                self.cancels.discard(job_id)

    def _reconcile(self) -> None:
        """While nothing is held, our claimed list should be empty: ids in it that this process never
        learnt of (a claim retried after its reply was lost, a load that raised) go back to their queues."""
        for job_id, _ in self.queue.give_back_all(exclude=self._ending_ids()):
            log.warning("gave back a claimed job this worker did not know it held", extra={"job_id": job_id})

    def _wait_for_work(self) -> list[Claimed]:
        """Block (a slice at a time, in turn over the served models) until a job arrives."""
        model = self.models[self._next_model % len(self.models)]
        self._next_model += 1
        return self.queue.claim_blocking(model, self.block_s / len(self.models))

    def _fill(self, model: str) -> None:
        """Claim more jobs of `model` while they keep coming: stop at max_batch images, when none
        arrived for batch_gap_s, or max_wait_s after the first. A lone request waits one gap; a burst
        is gathered into one batch."""
        started = last_arrival = time.monotonic()
        while not self.stop_requests:
            images = sum(job.remaining for job in self.held if job.spec.model == model)
            if images >= self.max_batch:
                return
            more = self.queue.claim(model, self.max_batch - images)
            now = time.monotonic()
            if more:
                self.held += more
                last_arrival = now
                continue
            if now - started >= self.max_wait_s or now - last_arrival >= self.batch_gap_s:
                return
            # Poll rather than BLMOVE: Redis rounds blocking timeouts up to its cron tick (100 ms at
            # the default hz 10), far longer than these waits.
            time.sleep(0.0005)

    # one batch

    def run_batch(self, batch: list[Slice]) -> None:
        batch = self._drop_unrunnable(batch)
        if not batch:
            return
        model = batch[0].job.spec.model
        for piece in batch:
            if not piece.job.started:
                self.queue.mark_started(piece.job)
                piece.job.started = True
                self.metrics.queue_wait.labels(model).observe(max(0.0, time.time() - piece.job.created_at))
        observer = BatchObserver(batch, report=self.queue.report, cancelled=self.cancels.snapshot,
                                 aborted=lambda: self.stop_requests > 1, metrics=self.metrics,
                                 publish=self.queue.publish_progress, previews=self.queue.preview_every,
                                 lost=self.queue.lost)
        size = sum(piece.size for piece in batch)
        self.state = State.busy
        self._set_busy(size)
        started = time.perf_counter()
        try:
            with_ids = logs.job_id.set(",".join(piece.job.id for piece in batch))
            try:
                images = self.engine.run(batch, on_eval=observer.on_eval)
            finally:
                logs.job_id.reset(with_ids)
        except Aborted:
            log.warning("batch aborted by a second stop signal; its jobs go back to the queue")
            return
        except Exception as error:  # a bug or a device error: fail the batch's jobs, keep serving
            log.exception("batch failed")
            reason = f"{type(error).__name__}: {error}"
            self._end([(piece.job, Outcome(piece.job.id, JobStatus.failed, error=reason)) for piece in batch])
            return
        finally:
            self._set_busy(0)
            self.state = State.idle
        elapsed = time.perf_counter() - started
        self.metrics.sampling.labels(model).observe(elapsed)
        nfe = sum(piece.size for piece in batch if piece.job.id not in observer.dropped)
        nfe *= batch[0].job.spec.sampler.nfe_per_image
        self.nfe_per_s = nfe / elapsed if not self.nfe_per_s else 0.7 * self.nfe_per_s + 0.3 * nfe / elapsed
        self._store(batch, images, observer.dropped, observer.lost_ids, elapsed)

    def _drop_unrunnable(self, batch: list[Slice]) -> list[Slice]:
        """End jobs cancelled before they ran, or that this worker cannot run."""
        flagged = self.queue.cancel_requested([piece.job.id for piece in batch]) | (
            self.cancels.snapshot() & {piece.job.id for piece in batch})
        keep, ended = [], []
        for piece in batch:
            problem = self.engine.check(piece.job.spec)
            if piece.job.id in flagged:
                ended.append((piece.job, Outcome(piece.job.id, JobStatus.cancelled)))
            elif problem is not None:
                ended.append((piece.job, Outcome(piece.job.id, JobStatus.failed, error=problem)))
            else:
                keep.append(piece)
        self._end(ended)
        return keep

    def _store(self, batch: list[Slice], images: list[GeneratedImage | None], dropped: set[str], lost: set[str],
               elapsed: float) -> None:
        """PNGs of the batch in one round trip, then the jobs that are complete in one transaction; jobs
        lost to another worker (before or at this write) are dropped."""
        pngs: list[tuple[str, int, bytes]] = []
        infos: dict[str, list[ImageInfo]] = {}
        row = 0
        for piece in batch:
            rows = images[row:row + piece.size]
            row += piece.size
            if piece.job.id in dropped:
                continue
            for k, image in enumerate(rows, start=piece.start):
                assert image is not None, "only the rows of cancelled jobs come back empty"
                data, text = self.engine.encode(piece.job.spec, image)
                pngs.append((piece.job.id, k, data))
                infos.setdefault(piece.job.id, []).append(
                    ImageInfo(index=k, seed=image.seed, class_label=image.class_label, metadata=text))
        lost = lost | self.queue.store_pngs(pngs, [(job_id, info) for job_id, images in infos.items()
                                                   for info in images])
        self.held = [job for job in self.held if job.id not in lost]
        ended = []
        for piece in batch:
            job = piece.job
            if job.id in lost:
                continue
            if job.id in dropped:
                ended.append((job, Outcome(job.id, JobStatus.cancelled)))
                continue
            job.images += infos[job.id]
            job.done = piece.stop
            job.sampling_s += elapsed
            self.metrics.images.labels(job.spec.model).inc(piece.size)
            if job.remaining == 0:
                result = JobResult(images=job.images, worker=self.queue.id, sampling_s=job.sampling_s)
                ended.append((job, Outcome(job.id, JobStatus.succeeded, result=result)))
        self._end(ended)

    def _end(self, ended: list[tuple[Claimed, Outcome]]) -> None:
        """The jobs leave `held` at once; their terminal states are written now, or, if Redis fails,
        kept in `pending` and written first thing in the next step."""
        if not ended:
            return
        gone = {job.id for job, _ in ended}
        self.held = [j for j in self.held if j.id not in gone]
        self.pending += ended
        self._write_pending()

    def _write_pending(self) -> None:
        if not self.pending:
            return
        written = self.queue.finish([outcome for _, outcome in self.pending])
        ended, self.pending = self.pending, []
        self._record_written(ended, written)

    def _record_written(self, ended: list[tuple[Claimed, Outcome]], written: set[str]) -> None:
        """Metrics and logs of terminal states just written (`written`: the ids Redis took)."""
        for job, outcome in ended:
            self.cancels.discard(job.id)
            if job.id not in written:
                log.warning("job was taken back by the reaper before it finished here", extra={"job_id": job.id})
                continue
            self.metrics.jobs.labels(job.spec.model, outcome.status.value).inc()
            self.metrics.latency.labels(job.spec.model).observe(max(0.0, time.time() - job.created_at))
            log.info("job %s", outcome.status.value, extra={"job_id": job.id, "images": job.spec.num_images,
                                                           "reason": outcome.error})

    def _set_busy(self, images: int) -> None:
        self.metrics.slot_rows.set(images)
        self.metrics.busy.set(1 if images else 0)

    # liveness

    def _hung(self) -> bool:
        """True when the main loop holds work but stopped making progress (see StepWorker)."""
        return False

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            if self._hung():
                return  # silent from now on: its heartbeat expires and the reaper reruns its jobs elsewhere
            try:
                info = self._info.model_copy(update={"busy": self.state is State.busy,
                                                     "nfe_per_s": round(self.nfe_per_s, 1)})
                self.queue.heartbeat(info)
                for job_id, outcome in self.queue.reap():
                    self.metrics.reaped.labels(outcome).inc()
                    model = self.queue.model_of(job_id) if outcome == "failed" else None
                    if model is not None:
                        self.metrics.jobs.labels(model, "failed").inc()
            except redis.RedisError as error:
                log.warning("heartbeat failed: %s", error)
            except Exception:  # a bug in the reaper must not stop the heartbeat (the reaper reruns our jobs)
                log.exception("unexpected error in the heartbeat thread")
            self._stop.wait(self.heartbeat_interval_s)
