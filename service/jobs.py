"""What POST /v1/generate and POST /v1/jobs share: admit a request, and show a job."""

from __future__ import annotations

import hashlib
import logging
import math

from contract.jobs import JobSpec, JobStatus, WorkerInfo
from service.catalog import Catalog
from service.errors import Problem, invalid
from service.ledger import IdempotencyConflict, JobRecord, Ledger, QueueFull
from service.metrics import GatewayMetrics
from service.schemas import GenerateRequest, ImageView, JobView, Timings
from service.settings import GatewaySettings
from service.validation import resolve

log = logging.getLogger("service.jobs")

# Retry-After of a 429 while no live worker reports a measured rate (none alive, or none has run a pass yet).
RETRY_AFTER_UNKNOWN_S = 5
# Retry-After is at most this: past an hour a client had better look again than trust the estimate.
RETRY_AFTER_MAX_S = 3600


def resolve_request(req: GenerateRequest, settings: GatewaySettings, ledger: Ledger, catalog: Catalog) -> JobSpec:
    """The request checked against its model card (404 unknown model, 422 bad field)."""
    model = req.model or catalog.default
    if model is None or model not in catalog.models:
        raise Problem(404, f"unknown model {model!r}; GET /v1/models lists them", field="model")
    card = catalog.card(model, ledger.published_cards)
    if card is None:
        raise Problem(503, f"model {model!r} is not loaded by any worker yet", field="model",
                      headers={"Retry-After": "5"})
    return resolve(req, model, card, max_images=settings.max_images, max_steps=settings.max_steps)


def admit(spec: JobSpec, owner: str, *, settings: GatewaySettings, ledger: Ledger, metrics: GatewayMetrics,
          idempotency_key: str | None, body: GenerateRequest, preview_every: int = 0) -> tuple[str, bool]:
    """Enqueue the job; returns (job id, created). A replayed Idempotency-Key returns its job first,
    whatever the queue holds. Otherwise a job above the per-request limit is a 422 naming the field to
    change, and one that would put the queued work above EDM_MAX_QUEUED_NFE a 429 with Retry-After
    (checked and queued in one transaction: concurrent requests cannot all pass). `preview_every`:
    see Ledger.submit."""
    body_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    try:
        replayed = None if idempotency_key is None else ledger.replay(owner, idempotency_key, body_hash)
    except IdempotencyConflict:
        raise _key_conflict() from None
    if replayed is not None:
        log.info("job replayed (Idempotency-Key)", extra={"job_id": replayed, "model": spec.model})
        return replayed, False
    check_job_size(spec, body, settings.job_nfe_limit)
    try:
        job_id, created = ledger.submit(spec, owner, idempotency_key=idempotency_key, body_hash=body_hash,
                                        preview_every=preview_every, max_queued_nfe=settings.max_queued_nfe)
    except IdempotencyConflict:
        raise _key_conflict() from None
    except QueueFull as full:
        metrics.jobs.labels(spec.model, "rejected").inc()
        raise _queue_full(full, spec.nfe_total, ledger) from None
    if created:
        metrics.jobs_submitted.labels(spec.model).inc()
    log.info("job %s", "accepted" if created else "replayed (Idempotency-Key)",
             extra={"job_id": job_id, "model": spec.model, "images": spec.num_images, "nfe": spec.nfe_total})
    return job_id, created


def check_job_size(spec: JobSpec, body: GenerateRequest, limit: int) -> None:
    """422 for a job whose network evaluations (images x NFE per image) exceed the per-request limit,
    naming num_steps when one image alone is too much, else the field that gave the images."""
    per_image = spec.sampler.nfe_per_image
    if spec.nfe_total <= limit:
        return
    if per_image > limit:
        raise invalid("num_steps", f"one image at {spec.sampler.num_steps} steps takes {per_image} network "
                      f"evaluations, above the limit of {limit} per request; use fewer steps")
    field = "count" if body.seeds is None and body.count is not None else "seeds"
    raise invalid(field, f"{spec.num_images} images x {per_image} network evaluations = {spec.nfe_total}, above "
                  f"the limit of {limit} per request: at most {limit // per_image} images at these settings")


def measured_rate(workers: list[WorkerInfo]) -> float:
    """The live workers' network evaluations per second: the sum of their heartbeats' nfe_per_s."""
    return sum(w.nfe_per_s for w in workers)


def retry_after_s(excess_nfe: int, rate: float) -> int:
    """Seconds until the workers' measured rate has taken `excess_nfe` off the queue: ceil(excess /
    rate), at least 1 and at most RETRY_AFTER_MAX_S; RETRY_AFTER_UNKNOWN_S while no worker has
    measured a rate yet (or none is alive)."""
    if rate <= 0:
        return RETRY_AFTER_UNKNOWN_S
    return min(RETRY_AFTER_MAX_S, max(1, math.ceil(excess_nfe / rate)))


def _queue_full(full: QueueFull, nfe: int, ledger: Ledger) -> Problem:
    rate = measured_rate(ledger.live_workers())
    wait = retry_after_s(full.queued + nfe - full.limit, rate)
    pace = f"the workers take {rate:g} per second" if rate > 0 else "the workers' rate is not measured yet"
    return Problem(429, f"the queue holds {full.queued} network evaluations and this job needs {nfe} (limit "
                   f"{full.limit}); {pace}: retry in about {wait} s", headers={"Retry-After": str(wait)},
                   queued_nfe=full.queued)


def _key_conflict() -> Problem:
    return Problem(422, "this Idempotency-Key was used with a different request body", field="Idempotency-Key")


def check_owner(ledger: Ledger, job_id: str, owner: str) -> None:
    """404 unless the job exists and belongs to `owner` (one read; visible_record reads it all)."""
    if ledger.owner_of(job_id) != owner:
        raise Problem(404, f"no job {job_id!r}")


def abandon(ledger: Ledger, metrics: GatewayMetrics, job_id: str) -> None:
    """The caller that waited for the job has gone and nobody else can name it (it sent no
    Idempotency-Key): cancel it unless it has ended (a running job stops at its next evaluation)."""
    before = ledger.status(job_id)
    if before is None or before.terminal:
        return
    model = ledger.model_of(job_id)
    if model is None:  # its record is gone: nothing to cancel (Ledger.cancel would do nothing)
        return
    cancel(ledger, metrics, job_id, model, before)
    log.info("job cancelled: its caller left", extra={"job_id": job_id})


def cancel(ledger: Ledger, metrics: GatewayMetrics, job_id: str, model: str, before: JobStatus) -> None:
    """Cancel the job (queued: at once; running: at its next evaluation). A job taken out of its queue
    counts as edm_jobs{outcome="cancelled"} here; a running one is counted by its worker."""
    if ledger.cancel(job_id) is JobStatus.cancelled and before is JobStatus.queued:
        metrics.jobs.labels(model, "cancelled").inc()


def visible_record(ledger: Ledger, job_id: str, owner: str) -> JobRecord:
    """The job if it exists and belongs to `owner`; else 404 (the same answer either way)."""
    record = ledger.record(job_id) if ledger.owner_of(job_id) == owner else None
    if record is None:
        raise Problem(404, f"no job {job_id!r}")
    return record


def job_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def job_view(record: JobRecord) -> JobView:
    created, started, finished = record.created_at, record.started_at, record.finished_at
    result = record.result
    images = [] if result is None else [
        ImageView(index=i.index, seed=i.seed, class_label=i.class_label, metadata=i.metadata,
                  url=f"{job_url(record.id)}/images/{i.index}.png") for i in result.images]
    return JobView(
        id=record.id, status=record.status, model=record.spec.model, seeds=record.spec.seeds,
        queue_position=record.queue_position, progress=record.progress, created_at=created,
        started_at=started, finished_at=finished,
        timings=Timings(queue_wait_s=None if started is None else round(started - created, 4),
                        sampling_s=None if result is None else round(result.sampling_s, 4),
                        total_s=None if finished is None else round(finished - created, 4)),
        reruns=record.reruns, error=record.error if record.status is not JobStatus.succeeded else None,
        images=images, cancel_requested=record.cancel_requested)
