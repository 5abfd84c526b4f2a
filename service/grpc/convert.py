"""edm.v1 messages <-> the gateway's own types (the REST request model, job records, events).

A gRPC request becomes the same `GenerateRequest` a REST body does, so both are validated by the
same code (service/validation.py); error fields are reported with their gRPC path
(`spec.sampler.num_steps`, not `num_steps`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from contract.events import JobEvent
from contract.jobs import ImageInfo, JobStatus
from service.errors import field_path
from service.grpc.stubs import job_pb2, service_pb2
from service.jobs import job_view
from service.ledger import JobRecord
from service.schemas import GenerateRequest

# REST name -> gRPC name of the sampler fields (inside GenerationSpec.sampler).
SAMPLER_FIELDS = {"num_steps": "num_steps", "sigma_min": "sigma_min", "sigma_max": "sigma_max", "rho": "rho",
                  "S_churn": "s_churn", "S_min": "s_min", "S_max": "s_max", "S_noise": "s_noise"}
SAMPLER_ENUMS = {"solver": job_pb2.Solver, "discretization": job_pb2.Discretization,
                 "schedule": job_pb2.Schedule, "scaling": job_pb2.Scaling}
SPEC_FIELDS = ("model", "seeds", "count", "start", "class_label")


class InvalidField(ValueError):
    """A request field that cannot even be read (an enum value this server does not know)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def grpc_field(rest: str) -> str:
    """'num_steps' -> 'spec.sampler.num_steps', 'seeds[2]' -> 'spec.seeds[2]' (REST names to gRPC paths)."""
    head = re.split(r"[.\[]", rest, maxsplit=1)[0]
    tail = rest[len(head):]
    if head in SAMPLER_FIELDS:
        return f"spec.sampler.{SAMPLER_FIELDS[head]}{tail}"
    if head in SAMPLER_ENUMS:
        return f"spec.sampler.{head}{tail}"
    if head in SPEC_FIELDS:
        return f"spec.{rest}"
    if head == "Idempotency-Key":
        return "idempotency-key"
    return rest


def validation_error(error: ValidationError) -> tuple[str, str]:
    """(gRPC field path, message) of the first error."""
    first = error.errors()[0]
    return grpc_field(field_path(("body", *first["loc"]))), first["msg"]


def _enum_name(enum: Any, value: int, field: str) -> str | None:
    if value == 0:
        return None
    try:
        name: str = enum.Name(value)
    except ValueError:
        raise InvalidField(f"spec.sampler.{field}", f"unknown value {value}") from None
    return name.split("_", 1)[1].lower()


def generate_request(spec: Any) -> GenerateRequest:
    """A GenerationSpec as the REST request model (raises ValidationError or InvalidField)."""
    body: dict[str, Any] = {"model": spec.model or None}
    if spec.seeds:
        body["seeds"] = list(spec.seeds)
    for name in ("count", "start"):
        if spec.HasField(name):
            body[name] = getattr(spec, name)
    which = spec.WhichOneof("class_label")
    if which is not None:
        body["class_label"] = getattr(spec, which)
    sampler = spec.sampler
    for grpc_name, rest_name in ((g, r) for r, g in SAMPLER_FIELDS.items()):
        if sampler.HasField(grpc_name):
            body[rest_name] = getattr(sampler, grpc_name)
    for name, enum in SAMPLER_ENUMS.items():
        body[name] = _enum_name(enum, getattr(sampler, name), name)
    return GenerateRequest.model_validate(body)


# -- answers ------------------------------------------------------------------------------------------

_STATUS = {JobStatus.queued: job_pb2.JOB_STATUS_QUEUED, JobStatus.running: job_pb2.JOB_STATUS_RUNNING,
           JobStatus.succeeded: job_pb2.JOB_STATUS_SUCCEEDED, JobStatus.failed: job_pb2.JOB_STATUS_FAILED,
           JobStatus.cancelled: job_pb2.JOB_STATUS_CANCELLED}


def job_status(status: JobStatus | str) -> Any:
    return _STATUS[JobStatus(status)]


def image(info: ImageInfo | dict[str, Any], png: bytes | None) -> Any:
    info = info if isinstance(info, ImageInfo) else ImageInfo.model_validate(info)
    message = job_pb2.Image(index=info.index, seed=info.seed, png=png or b"", metadata=info.metadata)
    if info.class_label is not None:
        message.class_label = info.class_label
    return message


def timings(view: Any) -> Any:
    return job_pb2.Timings(**{k: v for k, v in view.model_dump().items() if v is not None})


def job(record: JobRecord, pngs: list[bytes | None] | None = None) -> Any:
    view = job_view(record)
    images = record.result.images if record.result is not None else []
    message = job_pb2.Job(
        id=record.id, status=job_status(record.status), model=record.spec.model, seeds=record.spec.seeds,
        progress=job_pb2.JobProgress(**record.progress.model_dump()), created_at=record.created_at,
        timings=timings(view.timings), reruns=record.reruns, error=view.error or "",
        images=[image(info, pngs[k] if pngs else None) for k, info in enumerate(images)],
        cancel_requested=record.cancel_requested)
    for name in ("queue_position", "started_at", "finished_at"):
        value = getattr(view, name)
        if value is not None:
            setattr(message, name, value)
    return message


def event(ev: JobEvent) -> Any:
    """A stream event as a JobEvent message."""
    message = job_pb2.JobEvent(job_id=ev.job_id, event_id=ev.id)
    data = ev.data
    if ev.type == "queued":
        message.queued.position = data["position"]
    elif ev.type == "started":
        message.started.CopyFrom(job_pb2.StartedEvent(started_at=data["started_at"], worker=data["worker"]))
    elif ev.type == "progress":
        message.progress.CopyFrom(job_pb2.ProgressEvent(
            step=data["step"], num_steps=data["num_steps"], sigma=data["sigma"], nfe=data["nfe"],
            nfe_total=data["nfe_total"], images_done=data["images_done"],
            frames=[job_pb2.Frame(index=f.index, png=f.png) for f in ev.frames]))
    elif ev.type == "image":
        message.image.image.CopyFrom(image(data, ev.frames[0].png if ev.frames else None))
    elif ev.type == "done":
        message.done.CopyFrom(job_pb2.DoneEvent(images=data["images"], sampling_s=data["sampling_s"]))
    elif ev.type == "error":
        message.error.CopyFrom(job_pb2.ErrorEvent(status=job_status(data["status"]), message=data["message"]))
    else:
        raise ValueError(f"unknown event type {ev.type!r}")
    return message


def model(entry: dict[str, Any]) -> Any:
    """One entry of Catalog.describe() as a Model message."""
    card = entry["card"]
    message = service_pb2.Model(name=entry["name"], is_default=entry["default"], format=entry["format"],
                                card_known=card is not None)
    if card is not None:
        message.img_resolution = card["img_resolution"]
        message.img_channels = card["img_channels"]
        message.label_dim = card["label_dim"]
        message.class_names.extend(card.get("class_names") or [])
        message.sigma_min = _float(card["sigma_min"])
        message.sigma_max = _float(card["sigma_max"])
        message.card_json = json.dumps(card)
    return message


def _float(value: Any) -> float:
    return float(value)  # "Infinity" strings included
