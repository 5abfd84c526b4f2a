"""Asynchronous jobs: submit, poll, fetch images, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from contract.jobs import JobStatus
from service.deps import CatalogDep, IdempotencyKeyDep, LedgerDep, MetricsDep, OwnerDep, SettingsDep
from service.errors import Problem
from service.jobs import admit, cancel, job_url, job_view, resolve_request, visible_record
from service.schemas import GenerateRequest, ImageIndex, JobId, JobView
from service.validation import known_job_id

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobView)
def submit_job(body: GenerateRequest, settings: SettingsDep, ledger: LedgerDep, catalog: CatalogDep,
               metrics: MetricsDep, owner: OwnerDep, idempotency_key: IdempotencyKeyDep = None) -> JSONResponse:
    """Queue a generation job; 202 with Location: /v1/jobs/{id}. A repeated Idempotency-Key
    returns the job it created the first time (header Idempotent-Replayed: true)."""
    return queue_job(body, settings, ledger, catalog, metrics, owner, idempotency_key)


def queue_job(body: GenerateRequest, settings: SettingsDep, ledger: LedgerDep, catalog: CatalogDep,
              metrics: MetricsDep, owner: OwnerDep, idempotency_key: str | None,
              preview_every: int = 0) -> JSONResponse:
    """POST /v1/jobs's work; `preview_every` > 0 also asks for x0 previews (the playground's route)."""
    spec = resolve_request(body, settings, ledger, catalog)
    job_id, created = admit(spec, owner, settings=settings, ledger=ledger, metrics=metrics,
                            idempotency_key=idempotency_key, body=body, preview_every=preview_every)
    view = job_view(visible_record(ledger, job_id, owner))
    headers = {"Location": job_url(job_id)}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(view.model_dump(mode="json"), status_code=202, headers=headers)


@router.get("/{job_id}", response_model=JobView)
def get_job(job_id: JobId, ledger: LedgerDep, owner: OwnerDep) -> JobView:
    return job_view(visible_record(ledger, known_job_id(job_id), owner))


@router.get("/{job_id}/images/{index}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def get_image(job_id: JobId, index: ImageIndex, ledger: LedgerDep, owner: OwnerDep) -> Response:
    k = int(index)  # canonical decimal (the path's pattern): "1_0", "+1", "01" never get here
    record = visible_record(ledger, known_job_id(job_id), owner)
    if record.status is not JobStatus.succeeded:
        raise Problem(409, f"job {job_id} is {record.status.value}; images exist once it has succeeded")
    data = ledger.png(job_id, k) if k < record.spec.num_images else None
    if data is None:
        raise Problem(404, f"job {job_id} has no image {k}")
    image = record.result.images[k] if record.result else None
    headers = {} if image is None else {"X-Seed": str(image.seed), "X-Class-Label": str(image.class_label)}
    return Response(data, media_type="image/png", headers=headers)


@router.post("/{job_id}/cancel", response_model=JobView)
def cancel_job(job_id: JobId, ledger: LedgerDep, metrics: MetricsDep, owner: OwnerDep) -> JobView:
    """Queued: cancelled at once. Running: stops at its next network evaluation (poll for it)."""
    record = visible_record(ledger, known_job_id(job_id), owner)
    if record.status in (JobStatus.succeeded, JobStatus.failed):
        raise Problem(409, f"job {job_id} already {record.status.value}")
    cancel(ledger, metrics, job_id, record.spec.model, record.status)
    return job_view(visible_record(ledger, job_id, owner))
