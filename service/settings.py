"""The gateway's configuration from the environment (prefix EDM_); what it shares with the worker is
contract/settings.py. Built by the app factory, never at import time."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from contract.settings import CommonSettings, split_list


class GatewaySettings(CommonSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted bearer tokens; empty = no authentication")
    max_queued_nfe: int = Field(default=200_000, gt=0, description="queued work (NFE) above which jobs get 429")
    sync_timeout_s: float = Field(default=60.0, gt=0, description="how long POST /v1/generate waits")
    max_body_bytes: int = Field(default=64 * 1024, gt=0)
    max_images: int = Field(default=256, gt=0, description="seeds per request")
    max_steps: int = Field(default=1000, ge=2, description="num_steps per request")
    idempotency_ttl_s: int = Field(default=86400, gt=0)
    http_threads: int = Field(default=256, gt=0, description="threads serving blocking route handlers")
    grpc_port: int | None = Field(default=None, ge=0, le=65535,
                                  description="port of the gRPC server (edm.v1); unset = no gRPC, 0 = any free port")
    grpc_threads: int = Field(default=128, gt=0, description="gRPC handler threads; each open event stream holds one")
    grpc_health_interval_s: float = Field(default=0.5, gt=0, description="how often gRPC health re-checks readiness")

    _split_keys = field_validator("api_keys", mode="before")(split_list)
