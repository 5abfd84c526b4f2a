"""The OpenAPI document, made the contract the gateway keeps.

FastAPI writes the document from the routes; `document()` then rewrites what it cannot know:

- **every status each operation answers**, from one table (`OPERATIONS`, below): success
  statuses with their response headers, and every error as RFC 9457 `application/problem+json`
  (the `Problem` schema: what service/errors.py writes), the 422 included, which FastAPI would
  document as `application/json` `HTTPValidationError`;
- **the limits of the running server** as schema bounds: `num_steps` ≤ EDM_MAX_STEPS, `seeds` and
  `count` ≤ EDM_MAX_IMAGES, the body size limit in the request body's description;
- **bearer auth** and the 401s only when the server has API keys;
- stable `operationId`s and **links** (a job's id from POST /v1/jobs to GET, cancel, events and
  images), which clients and stateful fuzzers follow.

The table must name exactly the operations the app serves, and each operation's statuses must
include every one its route declares: `document()` raises otherwise, and tests/service/test_openapi.py
builds the document, so a route added or changed without the table fails there.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.errors import PROBLEM_JSON
from service.settings import GatewaySettings

SCHEMAS = "#/components/schemas/"
EVENT_ID = r"^(\d+(-\d+)?)?$"  # a Redis stream id, or empty (from the start), as service/routes/events.py checks


@dataclass(frozen=True)
class Header:
    """A response header: its description, JSON Schema, and whether every such response has it."""

    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False

    def spec(self) -> dict[str, Any]:
        return {"description": self.description, "required": self.required, "schema": dict(self.schema)}


RETRY_AFTER = Header("seconds to wait before trying again", {"type": "integer", "minimum": 0}, required=True)
LOCATION = Header("the job's URL, /v1/jobs/{id}", required=True)
REPLAYED = Header("`true` when an earlier request with this Idempotency-Key created the job")
SEED = Header("the image's seed (decimal)")
CLASS_LABEL = Header("the class the image was drawn for (decimal index)")
CONTENT_LOCATION = Header("the job's URL (JSON) or the image's URL (PNG)", required=True)
SERVER_TIMING = Header("where the job's time went, in ms: queue, sampling, job (W3C Server-Timing)",
                       required=True)
JOB_ID = Header("the job's id (PNG answers)")
REQUEST_ID = Header("the request's id (the client's X-Request-Id when well formed); the gateway's log lines "
                    "carry it", required=True)
WWW_AUTHENTICATE = Header("`Bearer realm=\"edm-serve\"`", required=True)


@dataclass(frozen=True)
class Answer:
    """One status of one operation. `schema`: a component name for application/json (None keeps
    what FastAPI derived from the route, e.g. image/png or text/event-stream); errors are always
    problem+json."""

    description: str
    headers: dict[str, Header] = field(default_factory=dict)
    schema: str | None = None
    links: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    """`parameters`: JSON Schema keywords a route's check adds to a parameter's declared schema."""

    operation_id: str
    answers: dict[int, Answer]
    auth: bool = True  # 401 and the bearer scheme, when the server has API keys
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)


def _job_links(job_id: str) -> dict[str, dict[str, Any]]:
    """From a response that names a job (by the runtime expression `job_id`) to what can follow it."""
    return {
        "GetJob": {"operationId": "getJob", "parameters": {"job_id": job_id},
                   "description": "the job's status and, once it succeeded, its images"},
        "CancelJob": {"operationId": "cancelJob", "parameters": {"job_id": job_id}},
        "GetJobEvents": {"operationId": "getJobEvents", "parameters": {"job_id": job_id},
                         "description": "the job's events as Server-Sent Events"},
        "GetJobImage": {"operationId": "getJobImage", "parameters": {"job_id": job_id, "index": "0"},
                        "description": "its first image (409 until the job has succeeded)"},
    }


JOB_LINKS = _job_links("$response.body#/id")

# Errors, by status, with what they mean on most routes (an operation may say more).
BODY_UNREADABLE = Answer("the body is not UTF-8 text")
UNAUTHORIZED = Answer("no API key, or an unknown one (`Authorization: Bearer KEY`)",
                      {"WWW-Authenticate": WWW_AUTHENTICATE})
NO_JOB = Answer("no such job, or another key's job (the same answer either way)")
TIMEOUT = Answer("the request's body did not arrive in time")
TOO_LARGE = Answer("the request's body is larger than EDM_MAX_BODY_BYTES")
INVALID = Answer("a field is invalid: `field` names the first, `errors` lists each")
QUEUE_FULL = Answer("too much work is queued (or too many requests wait): retry after Retry-After",
                    {"Retry-After": RETRY_AFTER})
UNEXPECTED = Answer("an unexpected error: the request id finds it in the gateway's logs")
STORE_DOWN = Answer("the job store (Redis) is unreachable: retry shortly", {"Retry-After": RETRY_AFTER})
EVERY_ROUTE = {408: TIMEOUT, 413: TOO_LARGE, 500: UNEXPECTED}  # answered by the middleware
SUBMIT = {  # what POST /v1/generate, POST /v1/jobs and POST /ui/jobs share
    400: BODY_UNREADABLE, 404: Answer("unknown model (`field`: model)"), 422: INVALID, 429: QUEUE_FULL,
    503: Answer("the job store (Redis) is unreachable, or no worker has loaded the model yet: retry shortly",
                {"Retry-After": RETRY_AFTER}),
}
QUEUED = Answer("queued; poll Location, or follow the links", {"Location": LOCATION, "Idempotent-Replayed": REPLAYED},
                "JobView", JOB_LINKS)

# The table: every operation the document lists, and every status each one answers.
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/v1/generate"): Operation("generate", {
        200: Answer("the image (image/png, one image) or every image in base64 (application/json)",
                    {"Content-Location": CONTENT_LOCATION, "Server-Timing": SERVER_TIMING, "X-Job-Id": JOB_ID,
                     "X-Seed": SEED, "X-Class-Label": CLASS_LABEL}),
        202: Answer("not done within EDM_SYNC_TIMEOUT_S: the job, still queued or running",
                    {"Location": LOCATION}, "JobView", JOB_LINKS),
        **SUBMIT, **EVERY_ROUTE,
        406: Answer("Accept: image/png, but the request makes more than one image"),
        409: Answer("the job was cancelled while the request waited (`job_id`)"),
        410: Answer("the job's images expired before they were read"),
        500: Answer("the job failed (the worker's reason, `job_id`), or an unexpected error"),
    }),
    ("POST", "/v1/jobs"): Operation("createJob", {202: QUEUED, **SUBMIT, **EVERY_ROUTE}),
    ("POST", "/ui/jobs"): Operation("createPlaygroundJob", {202: QUEUED, **SUBMIT, **EVERY_ROUTE}),
    ("GET", "/v1/jobs/{job_id}"): Operation("getJob", {
        200: Answer("the job: status, queue position, progress, timings, images", schema="JobView",
                    links={"GetJobImage": {"operationId": "getJobImage",
                                           "parameters": {"job_id": "$response.body#/id", "index": "0"}}}),
        404: NO_JOB, 503: STORE_DOWN, **EVERY_ROUTE,
    }),
    ("GET", "/v1/jobs/{job_id}/images/{index}.png"): Operation("getJobImage", {
        200: Answer("the PNG, with its generation metadata in tEXt chunks",
                    {"X-Seed": SEED, "X-Class-Label": CLASS_LABEL}),
        404: Answer("no such job (or another key's), or no such image"),
        409: Answer("the job has not succeeded (images exist once it has)"),
        422: INVALID, 503: STORE_DOWN, **EVERY_ROUTE,
    }),
    ("POST", "/v1/jobs/{job_id}/cancel"): Operation("cancelJob", {
        200: Answer("the job after the request: cancelled if it was queued; a running job stops at its next "
                    "network evaluation (`cancel_requested`)", schema="JobView"),
        404: NO_JOB, 409: Answer("the job already succeeded or failed"), 503: STORE_DOWN, **EVERY_ROUTE,
    }),
    ("GET", "/v1/jobs/{job_id}/events"): Operation("getJobEvents", {
        200: Answer("the job's events as Server-Sent Events, from its first (or after Last-Event-ID / `after`) "
                    "to done or error"),
        204: Answer("resumed after the job's last event: nothing more will come"),
        404: NO_JOB, 422: Answer("Last-Event-ID or `after` is not an event id"),
        429: Answer("too many event streams are open: retry after Retry-After", {"Retry-After": RETRY_AFTER}),
        503: STORE_DOWN, **EVERY_ROUTE,
    }, parameters={"after": {"pattern": EVENT_ID}, "Last-Event-ID": {"pattern": EVENT_ID}}),
    ("GET", "/v1/models"): Operation("listModels", {
        200: Answer("every model with its source, recommended settings and card", schema="ModelsResponse"),
        **EVERY_ROUTE,
    }),
    ("GET", "/healthz"): Operation("healthz", {
        200: Answer("the process is up and its event loops turn"),
        503: Answer("an event loop (REST, gRPC, probes) has not turned for EDM_LOOP_STALL_S (`stalled`: which, for "
                    "how many seconds), or the REST server is not listening (starting, stopping)",
                    {"Retry-After": RETRY_AFTER}),
        **EVERY_ROUTE,
    }, auth=False),
    ("GET", "/readyz"): Operation("readyz", {
        200: Answer("Redis answers and every model has a live worker (`workers`: how many per model)"),
        503: Answer("not ready: the gateway is starting or stopping, Redis is unreachable, or a model has no live "
                    "worker (`workers`; `loading`: who is downloading or loading it, with progress)",
                    {"Retry-After": RETRY_AFTER}),
        **EVERY_ROUTE,
    }, auth=False),
}

PROBLEM = {
    "title": "Problem",
    "description": "An error, as RFC 9457 problem details (media type application/problem+json). Members beyond "
                   "type, title, status, detail and instance are this API's extensions; clients ignore "
                   "members they do not know.",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "a URI naming the kind of problem: about:blank (the status "
                                                  "says it all) or urn:edm-serve:problem:NAME"},
        "title": {"type": "string", "description": "a short summary of the kind of problem"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599, "description": "the HTTP status"},
        "detail": {"type": "string", "description": "what went wrong with this request, in words"},
        "instance": {"type": "string", "description": "the request's path"},
        "request_id": {"type": "string", "description": "as in the X-Request-Id header"},
        "field": {"type": "string", "description": "the request field at fault, e.g. `seeds[2]`, "
                                                   "`Idempotency-Key`"},
        "errors": {"type": "array", "description": "every invalid field (422)",
                   "items": {"type": "object", "required": ["field", "message"],
                             "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
        "job_id": {"type": "string", "description": "the job the problem is about"},
        "queued_nfe": {"type": "integer", "minimum": 0, "description": "network evaluations queued (429)"},
        "workers": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                    "description": "live workers per model (readiness)"},
        "loading": {"type": "object", "additionalProperties": {"type": "object"},
                    "description": "models being downloaded or loaded, with their progress (readiness)"},
    },
}


def install(app: FastAPI, settings: GatewaySettings) -> None:
    """Serve `document(app, settings)` as /openapi.json (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(app: FastAPI, settings: GatewaySettings) -> dict[str, Any]:
    """FastAPI's document for `app`, rewritten from OPERATIONS and `settings`."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = copy.deepcopy(PROBLEM)
    served = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    if served != set(OPERATIONS):
        raise RuntimeError(f"service/openapi.py's table is stale: routes not in it {sorted(served - set(OPERATIONS))},"
                           f" entries with no route {sorted(set(OPERATIONS) - served)}")
    for (method, path), operation in OPERATIONS.items():
        _rewrite(doc["paths"][path][method.lower()], operation, bool(settings.api_keys), f"{method} {path}")
    if settings.api_keys:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                           "description": "one of EDM_API_KEYS"}}
    _apply_limits(doc, settings)
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and f'"{SCHEMAS}{unused}"' not in json.dumps(doc):
            del schemas[unused]
    return doc


def _rewrite(spec: dict[str, Any], operation: Operation, keys: bool, name: str) -> None:
    answers = dict(operation.answers)
    if operation.auth and keys:
        answers[401] = UNAUTHORIZED
        spec["security"] = [{"bearer": []}]
    derived = spec.get("responses", {})
    # What the route's decorator declares, less the 422 FastAPI adds to any route with parameters.
    declared = {int(status) for status, response in derived.items()
                if not (status == "422" and response.get("description") == "Validation Error")}
    if not declared <= set(answers):
        raise RuntimeError(f"{name} declares statuses {sorted(declared - set(answers))} "
                           "that service/openapi.py's table does not list")
    responses: dict[str, Any] = {}
    for status in sorted(answers):
        answer = answers[status]
        response: dict[str, Any] = {"description": answer.description}
        if status >= 400:
            response["content"] = {PROBLEM_JSON: {"schema": _problem(status)}}
        elif answer.schema is not None:
            response["content"] = {"application/json": {"schema": {"$ref": SCHEMAS + answer.schema}}}
        elif "content" in derived.get(str(status), {}):
            response["content"] = derived[str(status)]["content"]
        headers = {"X-Request-Id": REQUEST_ID, **answer.headers}
        response["headers"] = {header: spec_.spec() for header, spec_ in headers.items()}
        if answer.links:
            response["links"] = copy.deepcopy(answer.links)
        responses[str(status)] = response
    spec["responses"] = responses
    spec["operationId"] = operation.operation_id
    for parameter in spec.get("parameters", []):
        schema = parameter["schema"]
        if "anyOf" in schema:  # `str | None`: a parameter is absent or a string, never null
            branches = [branch for branch in schema.pop("anyOf") if branch.get("type") != "null"]
            schema.update(branches[0] if len(branches) == 1 else {"anyOf": branches})
        schema.update(operation.parameters.get(parameter["name"], {}))
    unknown = set(operation.parameters) - {parameter["name"] for parameter in spec.get("parameters", [])}
    if unknown:
        raise RuntimeError(f"{name} has no parameters {sorted(unknown)}")


def _problem(status: int) -> dict[str, Any]:
    """The Problem schema with this response's status; a 422 always names its field."""
    specific: dict[str, Any] = {"properties": {"status": {"const": status}}}
    if status == 422:
        specific["required"] = ["field"]
    return {"allOf": [{"$ref": SCHEMAS + "Problem"}, specific]}


def _apply_limits(doc: dict[str, Any], settings: GatewaySettings) -> None:
    """The running server's per-request limits as bounds of the request schema."""
    request = doc["components"]["schemas"]["GenerateRequest"]["properties"]
    _bound(request["num_steps"], "integer", "maximum", settings.max_steps)
    _bound(request["count"], "integer", "maximum", settings.max_images)
    _bound(request["seeds"], "array", "maxItems", settings.max_images)
    note = f"At most {settings.max_body_bytes} bytes (EDM_MAX_BODY_BYTES; 413 above)."
    examples = {
        "one": {"summary": "one image of the default model, a random seed, a random class", "value": {}},
        "seeds": {"summary": "seeds from 0, with Heun's 2nd order solver",
                  "value": {"count": min(4, settings.max_images), "start": 0, "solver": "heun",
                            "num_steps": min(18, settings.max_steps)}},
    }
    for path in ("/v1/generate", "/v1/jobs", "/ui/jobs"):
        body = doc["paths"][path]["post"]["requestBody"]
        body["description"] = note
        body["content"]["application/json"]["examples"] = copy.deepcopy(examples)


def _bound(schema: dict[str, Any], type_: str, keyword: str, limit: int) -> None:
    """Set `keyword` (an upper bound) to `limit` on `schema` or on its branches of type `type_`, keeping a
    tighter bound the model already declares."""
    targets = [s for s in schema.get("anyOf", [schema]) if s.get("type") == type_]
    if not targets:
        raise RuntimeError(f"no {type_} schema to bound in {schema}")
    for target in targets:
        target[keyword] = min(limit, target.get(keyword, limit))
