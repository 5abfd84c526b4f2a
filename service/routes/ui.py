"""The web playground: GET / (the page), GET /ui/{file} (its scripts and styles), and
POST /ui/jobs, which queues a job like POST /v1/jobs and asks the worker for x0 previews.

The page is plain HTML, CSS and JavaScript from service/static/ (no build step, nothing fetched
from any other origin). Every answer of this module carries a Content-Security-Policy that allows
scripts, styles and connections to this origin only, images from this origin and from data:/blob:
URLs (previews and downloads), and no inline script.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse

from service.deps import CatalogDep, IdempotencyKeyDep, LedgerDep, MetricsDep, OwnerDep, SettingsDep
from service.errors import Problem
from service.routes.jobs import queue_job
from service.schemas import GenerateRequest, JobView

router = APIRouter(tags=["playground"])

STATIC = Path(__file__).resolve().parent.parent / "static"
# The files the page may load, with their media types; nothing else under static/ is served.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "view.js": "text/javascript; charset=utf-8",
    "zip.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


def _file(name: str) -> FileResponse:
    if name not in FILES:
        raise Problem(404, f"no playground file {name!r}")
    return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)


@router.get("/", response_class=FileResponse, include_in_schema=False)
def page() -> FileResponse:
    return _file("index.html")


def _static(name: str) -> Callable[[], FileResponse]:
    return lambda: _file(name)


# One route per file, so that /ui/jobs is POST's alone: another method there gets 405 with `Allow: POST`.
for _name in FILES:
    router.add_api_route(f"/ui/{_name}", _static(_name), methods=["GET"], response_class=FileResponse,
                         include_in_schema=False, name=f"static:{_name}")


@router.post("/ui/jobs", status_code=202, response_model=JobView)
def submit_with_previews(body: GenerateRequest, settings: SettingsDep, ledger: LedgerDep, catalog: CatalogDep,
                         metrics: MetricsDep, owner: OwnerDep, idempotency_key: IdempotencyKeyDep = None,
                         preview_every: Annotated[int, Query(ge=0, le=10_000)] = 1) -> JSONResponse:
    """POST /v1/jobs, plus x0 previews in the job's event stream with every k-th network evaluation
    (0: none); the playground watches the job at /v1/jobs/{id}/events."""
    return queue_job(body, settings, ledger, catalog, metrics, owner, idempotency_key, preview_every)
