"""What gateway and worker say to each other through Redis: pydantic models only, no torch.

A job is born in the gateway as a `JobSpec` (the request resolved against the model card), travels
as the kwargs of an RQ job, and ends as a `JobResult` (the RQ return value) plus one PNG per image.
While it runs, the worker writes `Progress`; each live worker publishes a `WorkerInfo` heartbeat.
"""

from __future__ import annotations

import enum
import functools
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from model.card import ModelCard
from model.choices import Discretization, Scaling, Schedule, Solver, nfe_per_image
from model.numerics import (
    RHO_HIGHEST,
    RHO_LOWEST,
    S_NOISE_HIGHEST,
    SIGMA_HIGHEST,
    SIGMA_LOWEST,
    EffectiveSchedule,
    NetworkRange,
    check_schedule,
)

SEED_LIMIT = 1 << 32  # the reference seeds each generator with seed % 2**32; we refuse the aliases


class SamplerParams(BaseModel):
    """The sampler options of the reference's generate.py, with its defaults.

    None for sigma_min / sigma_max picks the discretization's default range; None for S_max means
    infinity (JSON has no infinity). solver, discretization, schedule and scaling all None select
    the EDM sampler (Algorithm 2); any of them set selects the generalised one (Algorithm 1).

    Numbers, one rule per kind: an integer field takes a JSON integer only (18, not 18.0 or "18");
    a number field takes a JSON integer or float (7 or 7.0), finite; neither takes a boolean or a
    string. The bounds below are static (model/numerics.py); the gateway and the worker also
    check the whole schedule these settings give on the model (check_schedule) and refuse what
    float64 or the network's float32 could not compute.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_steps: StrictInt = Field(default=18, ge=2, description="integer: noise levels N; NFE = 2N-1 (Heun) or N "
                                 "(Euler); the server's EDM_MAX_STEPS bounds it")
    sigma_min: StrictFloat | None = Field(
        default=None, ge=SIGMA_LOWEST, le=SIGMA_HIGHEST, allow_inf_nan=False,
        description="number: lowest noise level; null = the discretization's default; clamped to the model's range")
    sigma_max: StrictFloat | None = Field(
        default=None, ge=SIGMA_LOWEST, le=SIGMA_HIGHEST, allow_inf_nan=False,
        description="number: highest noise level; null = the discretization's default; clamped to the model's range")
    rho: StrictFloat = Field(default=7.0, ge=RHO_LOWEST, le=RHO_HIGHEST, allow_inf_nan=False,
                             description="number: exponent of the EDM time steps")
    S_churn: StrictFloat = Field(default=0.0, ge=0, allow_inf_nan=False,
                                 description="number: stochasticity; gamma = min(S_churn / N, sqrt(2) - 1)")
    S_min: StrictFloat = Field(default=0.0, ge=0, allow_inf_nan=False,
                               description="number: churn only at noise levels >= S_min")
    S_max: StrictFloat | None = Field(default=None, ge=0, allow_inf_nan=False,
                                      description="number: churn only at noise levels <= S_max; null = infinity")
    S_noise: StrictFloat = Field(default=1.0, ge=0, le=S_NOISE_HIGHEST, allow_inf_nan=False,
                                 description="number: scale of the noise churn adds")
    solver: Solver | None = None
    discretization: Discretization | None = None
    schedule: Schedule | None = None
    scaling: Scaling | None = None

    @property
    def nfe_per_image(self) -> int:
        """Network evaluations per image: Heun's last step is a plain Euler step."""
        return nfe_per_image(self.num_steps, self.solver)

    def schedule_on(self, card: ModelCard) -> EffectiveSchedule:
        """The schedule these settings give on the model (model/numerics.py), computed in float64; raises
        SettingsError naming the setting when the sampler could not compute it. Gateway and worker both ask,
        once per request and per claimed job: the answer is remembered per (network range, settings)."""
        return _schedule_on(NetworkRange.of(card), self)

    def settings_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for model.generate.SamplerSettings (S_max None -> inf)."""
        kwargs = self.model_dump()
        kwargs["S_max"] = math.inf if self.S_max is None else self.S_max
        return kwargs


@functools.lru_cache(maxsize=4096)
def _schedule_on(net: NetworkRange, sampler: SamplerParams) -> EffectiveSchedule:
    """check_schedule, cached: it is a pure function of its inputs (a refusal raises and is not kept)."""
    return check_schedule(net, **sampler.settings_kwargs())


class JobSpec(BaseModel):
    """One accepted request, resolved: explicit seeds, one class label (or None = drawn) per seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    seeds: list[int]
    class_labels: list[int | None]
    sampler: SamplerParams = SamplerParams()

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def nfe_total(self) -> int:
        return self.num_images * self.sampler.nfe_per_image

    def batch_key(self) -> tuple[str, SamplerParams]:
        """Jobs with equal keys may share forward passes (request-level batching)."""
        return (self.model, self.sampler)


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Progress(BaseModel):
    """Where a running job stands. nfe counts network evaluations per image, summed over images."""

    step: int = 0
    num_steps: int = 0
    nfe: int = 0
    nfe_total: int = 0
    images_done: int = 0
    images_total: int = 0


class ImageInfo(BaseModel):
    """One finished image: its index in the job, seed, the class actually used, its PNG metadata."""

    index: int
    seed: int
    class_label: int | None
    metadata: dict[str, str]


class JobResult(BaseModel):
    """The RQ return value of a succeeded job (PNG bytes are stored beside it, one key per image)."""

    images: list[ImageInfo]
    worker: str
    sampling_s: float


class WorkerInfo(BaseModel):
    """A worker's heartbeat: alive while the key exists (its TTL is a few heartbeats)."""

    id: str
    models: list[str]
    device: str
    dtype: str
    pid: int
    host: str
    busy: bool = False
    nfe_per_s: float = Field(default=0.0, description="recent throughput, for Retry-After estimates")
    started_at: float
