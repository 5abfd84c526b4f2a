"""The gateway's configuration from the environment (prefix EDM_); what it shares with the worker is
contract/settings.py. Built by the app factory, never at import time."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from contract.settings import CommonSettings, split_list


class GatewaySettings(CommonSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted bearer tokens; empty = no authentication")
    max_queued_nfe: int = Field(default=200_000, gt=0, description="queued work (NFE) that admitting a job may not "
                                "exceed (429 with Retry-After); NFE leave the queue when a worker claims the job")
    max_job_nfe: int | None = Field(default=None, gt=0, description="work (NFE) one request may ask for, at most "
                                    "(422 naming seeds, count or num_steps); unset = max_queued_nfe, the largest job "
                                    "the queue can ever admit; at most max_queued_nfe")
    sync_timeout_s: float = Field(default=60.0, gt=0, description="how long POST /v1/generate waits")
    max_body_bytes: int = Field(default=64 * 1024, gt=0)
    max_images: int = Field(default=256, gt=0, description="seeds per request")
    max_steps: int = Field(default=1000, ge=2, description="num_steps per request")
    idempotency_ttl_s: int = Field(default=86400, gt=0)
    blocking_threads: int = Field(default=16, gt=0, description="threads for the short blocking work of requests "
                                  "(Redis reads and writes); waiting for jobs and events takes none")
    redis_max_connections: int = Field(default=48, gt=0, description="Redis connections for that work, at most (a "
                                       "request waits for a free one); the event hub and the probes have their own")
    max_streams: int = Field(default=4096, gt=0, description="open event streams (SSE and gRPC WatchJob / "
                             "GenerateStream) together; more get 429 / RESOURCE_EXHAUSTED")
    max_waiting: int = Field(default=2048, gt=0, description="requests waiting for their job (POST /v1/generate, gRPC "
                             "Generate) together; more get 429 / RESOURCE_EXHAUSTED")
    stream_buffer_bytes: int = Field(default=4 << 20, gt=0, description="events buffered for one slow stream reader; "
                                     "beyond it the reader catches up from Redis once it has drained its buffer")
    header_timeout_s: float = Field(default=10.0, gt=0, description="a connection whose request line and headers do "
                                    "not arrive in this time is closed")
    body_timeout_s: float = Field(default=30.0, gt=0, description="a request whose body does not arrive in this time "
                                  "gets 408 and its connection is closed")
    grpc_port: int | None = Field(default=None, ge=0, le=65535,
                                  description="port of the gRPC server (edm.v1); unset = no gRPC, 0 = any free port")
    probe_port: int | None = Field(default=None, ge=0, le=65535, description="port of the probe server: GET "
                                   "/healthz, /readyz and /metrics on an event loop and thread of their own, so that "
                                   "a probe never waits behind the REST loop's work; unset = none, 0 = any free port")
    loop_stall_s: float = Field(default=10.0, gt=0, description="liveness (/healthz) fails when one of the gateway's "
                                "event loops (REST, gRPC, probes) has not turned for this long")
    readiness_interval_s: float = Field(default=0.5, gt=0, description="how often readiness (GET /readyz, gRPC "
                                        "health) is re-checked, on a Redis connection of its own")

    _split_keys = field_validator("api_keys", mode="before")(split_list)

    @model_validator(mode="after")
    def _pool_fits_the_threads(self) -> GatewaySettings:
        if self.redis_max_connections < 2 * self.blocking_threads + 1:  # a thread may hold two at once
            raise ValueError(f"redis_max_connections ({self.redis_max_connections}) must be above twice "
                             f"blocking_threads ({self.blocking_threads})")
        return self

    @model_validator(mode="after")
    def _job_fits_the_queue(self) -> GatewaySettings:
        if self.max_job_nfe is not None and self.max_job_nfe > self.max_queued_nfe:
            raise ValueError(f"max_job_nfe ({self.max_job_nfe}) is above max_queued_nfe ({self.max_queued_nfe}): "
                             "a job that large could never be admitted")
        return self

    @property
    def job_nfe_limit(self) -> int:
        """The per-request work limit in force (max_job_nfe, else max_queued_nfe)."""
        return self.max_job_nfe if self.max_job_nfe is not None else self.max_queued_nfe
