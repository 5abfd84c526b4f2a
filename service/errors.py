"""Every error the gateway returns is application/problem+json (RFC 9457).

A problem has type, title, status and detail; validation problems also name the offending
field (`field`, and `errors` listing each one), so a client can point at its own input.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import OutOfMemoryError
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract import logs

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("service.errors")


class Problem(Exception):
    """Raise anywhere in a route to answer with a problem document."""

    def __init__(self, status: int, detail: str, *, field: str | None = None, title: str | None = None,
                 type_: str = "about:blank", headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.title = title or HTTPStatus(status).phrase
        self.type = type_
        self.headers = headers or {}
        self.extra = extra


def invalid(field: str, detail: str) -> Problem:
    """422 naming one request field."""
    return Problem(422, f"{field}: {detail}", field=field, title="Invalid request",
                   type_="urn:edm-serve:problem:invalid-request",
                   errors=[{"field": field, "message": detail}])


def shown(value: object, limit: int = 64) -> str:
    """repr(value) cut to about `limit` characters: what an error message may echo of a client's input."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's int-string limit
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else "a value"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def bounded(text: str, limit: int = 200) -> str:
    """A message or field name cut to about `limit` characters (a client's long key or value in it)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def internal_error() -> Problem:
    """500 for an error no handler foresaw; the details stay in the log (the request id finds them)."""
    return Problem(500, "an unexpected error occurred; the request id identifies it in the gateway's logs",
                   type_="urn:edm-serve:problem:internal-error")


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    body = problem_document(problem, None if request is None else request.url.path)
    return JSONResponse(body, status_code=problem.status, headers=problem.headers, media_type=PROBLEM_JSON)


def problem_document(problem: Problem, path: str | None = None) -> dict[str, Any]:
    """The problem+json body; `path`, the request's, becomes `instance`."""
    body: dict[str, Any] = {"type": problem.type, "title": problem.title, "status": problem.status,
                            "detail": problem.detail}
    if problem.field is not None:
        body["field"] = problem.field
    if path is not None and len(path) <= 512:  # a longer path is not echoed back
        body["instance"] = path
    if logs.request_id.get():
        body["request_id"] = logs.request_id.get()
    body.update(problem.extra)
    return body


_UNION_TAG = re.compile(r"^(int|str|float|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*|"
                        r"constrained-.*|strict-.*|lax-.*)$")


def field_path(loc: tuple[Any, ...]) -> str:
    """('body', 'seeds', 2) -> 'seeds[2]'; a header location keeps its name; union member tags
    (('class_label', 'int')) are dropped."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    parts = [p for p in parts if not (isinstance(p, str) and _UNION_TAG.match(p))]
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors():
            entry = {"field": bounded(field_path(tuple(e["loc"]))), "message": bounded(e["msg"])}
            if entry not in errors:  # a union reports once per member
                errors.append(entry)
        first = errors[0] if errors else {"field": "body", "message": "invalid request"}
        problem = Problem(422, f"{first['field']}: {first['message']}", field=first["field"],
                          title="Invalid request", type_="urn:edm-serve:problem:invalid-request",
                          errors=errors)
        return problem_response(problem, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(Problem(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})),
                                request)

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        detail = "the job store (Redis) is unreachable; retry shortly"
        if isinstance(exc, OutOfMemoryError):  # maxmemory reached under noeviction: it refuses writes, loses nothing
            detail = "the job store (Redis) is full and refuses new work until results expire; retry later"
        problem = Problem(503, detail, title="Service Unavailable", type_="urn:edm-serve:problem:store-unavailable",
                          headers={"Retry-After": "1"})
        return problem_response(problem, request)
