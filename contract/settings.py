"""Configuration from the environment (prefix EDM_): what gateway and worker share, and the worker's.

Nothing here is read at import time: the gateway's app factory and the worker's start-up build
their settings object and pass it on. Lists accept JSON or a comma-separated string. The gateway's
own settings are service/settings.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from contract.events import EVENT_STREAM_BYTES


def split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


def parse_models(value: Any) -> Any:
    """A name -> checkpoint mapping from JSON ({"name": "path"}) or "name=path,name2=path2"."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            return json.loads(text)
        pairs = [item.strip() for item in text.replace("\n", ",").split(",") if item.strip()]
        models = {}
        for pair in pairs:
            name, sep, path = pair.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"expected name=path, got {pair!r}")
            models[name.strip()] = path.strip()
        return models
    return value


class CommonSettings(BaseSettings):
    """What gateway and worker share: where Redis is, which models exist, how long results live."""

    model_config = SettingsConfigDict(env_prefix="EDM_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(default=2.0, gt=0, description="socket timeout of ordinary Redis commands")
    models: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="name -> checkpoint path (JSON or name=path,...)")
    models_file: Path | None = Field(default=None, description="JSON file {name: path}, or name=path lines")
    bundled_model: bool = Field(default=True, description="serve the bundled digits model as well")
    default_model: str | None = Field(default=None, description="model used when a request names none")
    result_ttl_s: int = Field(default=3600, gt=0, description="how long finished jobs and their PNGs are kept")
    failure_ttl_s: int = Field(default=86400, gt=0, description="how long failed and cancelled jobs are kept")
    log_level: str = "INFO"
    cache_dir: Path | None = Field(default=None, description="downloaded and converted models; default "
                                   "$XDG_CACHE_HOME/edm-serve or ~/.cache/edm-serve")
    allow_http: bool = Field(default=False, description="allow plain http:// model downloads")
    max_download_bytes: int = Field(default=4 << 30, gt=0, description="largest model download")
    download_retries: int = Field(default=5, ge=0, description="retries (resuming) of an interrupted download")
    max_parameters: int = Field(default=1_000_000_000, gt=0, description="largest network (weights) a "
                                "checkpoint may hold or claim; larger ones are refused before they are built")

    _parse_models = field_validator("models", mode="before")(parse_models)


class WorkerSettings(CommonSettings):
    serve: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="names of the models this worker serves; empty = all")
    device: str = Field(default="cpu", description="cpu, cuda or cuda:N")
    dtype: str = Field(default="auto", pattern="^(auto|fp32|fp16|bf16)$", description="auto = the checkpoint's choice")
    scheduler: Literal["step", "request"] = Field(
        default="step", description="step: continuous batching of evaluations in a slot table (model/slots.py); "
        "request: the earlier request-level batches (jobs with equal settings, kept for A/B benchmarks)")
    max_pass_rows: int = Field(default=64, gt=0, description="images carried by one forward pass, at most")
    slot_rows: int = Field(default=256, gt=0, description="step scheduler: images held in the slot table (each "
                           "at its own step); more than a pass carries are evaluated in turn, fairly per job")
    cohort_rows: int = Field(default=8, gt=0, description="step scheduler: a job's images enter the table in "
                             "groups of at most this many (smaller: finer fair sharing; larger: less overhead)")
    pass_sizes: str = Field(default="auto", pattern=r"^(auto|\d+\+|\d+(,\d+)*)$",
                            description="row counts of forward passes: auto (CPU any count from 4, CUDA 8,16,32,64 up "
                            "to max_pass_rows), 'N+' or 'A,B,C'; an image does not depend on what shares its passes")
    max_wait_s: float = Field(default=0.05, ge=0, description="request scheduler: longest wait to fill a batch")
    batch_gap_s: float = Field(default=0.002, ge=0, description="request scheduler: stop filling a batch when no job "
                               "came for this long")
    hang_timeout_s: float = Field(default=120.0, gt=0, description="a worker holding work whose forward passes "
                                  "stop completing for this long stops heartbeating (its jobs are rerun elsewhere)")
    metrics_port: int = Field(default=9101, ge=0, description="Prometheus port of this worker; 0 = off")
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    heartbeat_ttl_s: float = Field(default=5.0, gt=0, description="a worker silent this long is dead")
    max_reruns: int = Field(default=2, ge=0, description="reruns after worker deaths before a job fails")
    event_stream_bytes: int = Field(
        default=EVENT_STREAM_BYTES, ge=64 << 10, description="bound of one job's event stream in Redis (bytes): "
        "x0 previews stop at 3/4 of it, progress events at 7/8; started, image and terminal events always go "
        "(contract/events.py)")
    torch_threads: int = Field(default=1, gt=0)
    name: str | None = Field(default=None, description="worker id prefix (default host name)")

    _split_serve = field_validator("serve", mode="before")(split_list)
