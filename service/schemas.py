"""Request and response bodies of the REST API (the gateway's side; the worker never sees them)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from contract.jobs import SEED_LIMIT, JobStatus, Progress, SamplerParams

Seed = Annotated[StrictInt, Field(ge=0, lt=SEED_LIMIT)]


class GenerateRequest(SamplerParams):
    """POST /v1/generate and POST /v1/jobs.

    Seeds: `seeds` (a list), or `count` (+ `start`, default 0) for seeds start..start+count-1;
    neither: one image from a random seed (reported back). class_label: an index or a class
    name from the model card; omitted = drawn per seed from the seed's generator.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(default=None, description="model name; default: the server's default model")
    class_label: StrictInt | str | None = None
    seeds: list[Seed] | None = Field(default=None, min_length=1)
    count: int | None = Field(default=None, ge=1)
    start: Seed | None = None

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
