"""Request and response bodies of the REST API (the gateway's side; the worker never sees them)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from contract.jobs import SEED_LIMIT, JobStatus, Progress, SamplerParams

Seed = Annotated[StrictInt, Field(ge=0, lt=SEED_LIMIT)]
ClassName = Annotated[StrictStr, Field(min_length=1, max_length=256)]

# Path parameters, in their one canonical form. A job id of another form names no job: 404, answered
# without a lookup (routes call `known_job_id`); an image index of another form is a 422.
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{24}$"  # contract/ledger.new_job_id: 18 random bytes, URL-safe base64
JobId = Annotated[str, Path(description="a job id as the API returned it (24 characters: letters, digits, '-', "
                                        "'_'); any other form is a 404", json_schema_extra={"pattern": JOB_ID_PATTERN})]
ImageIndex = Annotated[str, Path(pattern=r"^(0|[1-9][0-9]{0,8})$", examples=["0"],
                                 description="an image's index in its job, in decimal without sign or leading zeros")]


class GenerateRequest(SamplerParams):
    """POST /v1/generate and POST /v1/jobs.

    Seeds: `seeds` (a list), or `count` (+ `start`, default 0) for seeds start..start+count-1;
    neither: one image from a random seed (reported back). class_label: an index or a class
    name from the model card; omitted = drawn per seed from the seed's generator.

    Numbers follow SamplerParams' rule: integer fields (seeds, count, start, num_steps, an index
    class_label) take JSON integers only; number fields take integers or floats; booleans and
    strings are not numbers.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(default=None, max_length=256,
                              description="model name; default: the server's default model")
    class_label: StrictInt | ClassName | None = Field(
        default=None, description="integer: a class index; string: a class name from the model card, or an index "
        "in decimal digits; omitted = drawn per seed")
    seeds: list[Seed] | None = Field(default=None, min_length=1, description="integers in 0..2^32-1")
    count: StrictInt | None = Field(default=None, ge=1, description="integer: seeds start..start+count-1")
    start: Seed | None = Field(default=None, description="integer: the first seed (with count; alone: one image)")

    def sampler(self) -> SamplerParams:
        return SamplerParams.model_validate(self.model_dump(include=set(SamplerParams.model_fields)))


class ImageView(BaseModel):
    index: int
    seed: int
    class_label: int | None
    url: str
    metadata: dict[str, str]


class Timings(BaseModel):
    queue_wait_s: float | None = None
    sampling_s: float | None = None
    total_s: float | None = None


class JobView(BaseModel):
    """GET /v1/jobs/{id}."""

    id: str
    status: JobStatus
    model: str
    seeds: list[int]
    queue_position: int | None = Field(default=None, description="0 = next to run; only while queued")
    progress: Progress
    created_at: float
    started_at: float | None
    finished_at: float | None
    timings: Timings
    reruns: int = Field(description="times the job was restarted after its worker died")
    error: str | None
    images: list[ImageView] = []
    cancel_requested: bool = False


class GeneratedImageJSON(BaseModel):
    index: int
    seed: int
    class_label: int | None
    png_base64: str
    metadata: dict[str, str]


class GenerateResponse(BaseModel):
    """POST /v1/generate with several images (or Accept: application/json)."""

    job_id: str
    model: str
    images: list[GeneratedImageJSON]
    timings: Timings


class ModelsResponse(BaseModel):
    default: str | None
    models: list[dict[str, Any]]
