"""The OpenAPI document (service/openapi.py), without servers: each operation lists exactly the
statuses of the table, every error as application/problem+json, the running limits as bounds,
auth only when the server has keys; and the problems the gateway really sends fit the schema."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import jsonschema_rs
import pytest

from service.app import create_app
from service.errors import PROBLEM_JSON, Problem, invalid, problem_response
from service.openapi import OPERATIONS, document
from service.settings import GatewaySettings


def build(**settings: Any) -> dict[str, Any]:
    app = create_app(GatewaySettings(**settings))
    return app.openapi()


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build(api_keys=["k"], max_steps=40, max_images=8, max_body_bytes=4096)


def operation(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return doc["paths"][path][method.lower()]


def test_every_operation_lists_the_table_statuses(doc: dict[str, Any]) -> None:
    listed = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert listed == set(OPERATIONS)
    for (method, path), entry in OPERATIONS.items():
        spec = operation(doc, method, path)
        expected = set(entry.answers) | ({401} if entry.auth else set())
        assert {int(s) for s in spec["responses"]} == expected, (method, path)
        assert spec["operationId"] == entry.operation_id
        for status, response in spec["responses"].items():
            assert response["headers"]["X-Request-Id"]["required"] is True
            if int(status) >= 400:
                assert set(response["content"]) == {PROBLEM_JSON}, (method, path, status)
                schema = response["content"][PROBLEM_JSON]["schema"]["allOf"]
                assert schema[0] == {"$ref": "#/components/schemas/Problem"}
                assert schema[1]["properties"]["status"] == {"const": int(status)}


def test_no_fastapi_validation_error_schema_is_left(doc: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in str(doc) and "application/json" not in str(
        {s: r for item in doc["paths"].values() for spec in item.values() for s, r in spec["responses"].items()
         if int(s) >= 400})
    assert set(doc["components"]["schemas"]) >= {"Problem", "GenerateRequest", "JobView"}


def test_headers_that_routes_send_are_documented(doc: dict[str, Any]) -> None:
    def headers(method: str, path: str, status: int) -> dict[str, Any]:
        return operation(doc, method, path)["responses"][str(status)]["headers"]

    for path in ("/v1/jobs", "/ui/jobs", "/v1/generate"):
        assert headers("POST", path, 202)["Location"]["required"] is True
        assert headers("POST", path, 429)["Retry-After"] == {
            "description": "seconds to wait before trying again", "required": True,
            "schema": {"type": "integer", "minimum": 0}}
        assert "Retry-After" in headers("POST", path, 503)
    assert "Idempotent-Replayed" in headers("POST", "/v1/jobs", 202)
    assert {"X-Job-Id", "X-Seed", "X-Class-Label", "Content-Location", "Server-Timing"} <= set(
        headers("POST", "/v1/generate", 200))
    assert "Retry-After" in headers("GET", "/v1/jobs/{job_id}/events", 429)
    assert "Retry-After" in headers("GET", "/readyz", 503)
    assert headers("GET", "/v1/models", 401)["WWW-Authenticate"]["required"] is True


def test_links_lead_from_a_new_job_to_what_follows_it(doc: dict[str, Any]) -> None:
    ids = {entry.operation_id for entry in OPERATIONS.values()}
    for path in ("/v1/jobs", "/ui/jobs", "/v1/generate"):
        links = operation(doc, "POST", path)["responses"]["202"]["links"]
        assert {link["operationId"] for link in links.values()} == {"getJob", "cancelJob", "getJobEvents",
                                                                      "getJobImage"} <= ids
        assert all(link["parameters"]["job_id"] == "$response.body#/id" for link in links.values())


def test_limits_are_the_running_settings(doc: dict[str, Any]) -> None:
    request = doc["components"]["schemas"]["GenerateRequest"]["properties"]

    def branch(prop: dict[str, Any], type_: str) -> dict[str, Any]:
        return next(s for s in prop.get("anyOf", [prop]) if s.get("type") == type_)

    assert branch(request["num_steps"], "integer")["maximum"] == 40
    assert branch(request["count"], "integer")["maximum"] == 8
    assert branch(request["seeds"], "array")["maxItems"] == 8
    assert "4096 bytes" in operation(doc, "POST", "/v1/jobs")["requestBody"]["description"]
    defaults = build()["components"]["schemas"]["GenerateRequest"]["properties"]
    assert branch(defaults["num_steps"], "integer")["maximum"] == 1000
    assert branch(defaults["seeds"], "array")["maxItems"] == 256


def test_auth_is_documented_only_when_the_server_has_keys(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert operation(doc, "GET", "/v1/jobs/{job_id}")["security"] == [{"bearer": []}]
    assert "security" not in operation(doc, "GET", "/healthz") and "401" not in operation(doc, "GET", "/readyz")[
        "responses"]
    open_doc = build()
    assert "securitySchemes" not in open_doc["components"]
    assert all("401" not in spec["responses"] and "security" not in spec
               for item in open_doc["paths"].values() for spec in item.values())


def test_header_and_query_parameters_are_never_null(doc: dict[str, Any]) -> None:
    for item in doc["paths"].values():
        for spec in item.values():
            for parameter in spec.get("parameters", []):
                assert "null" not in str(parameter["schema"]), parameter
    events = {p["name"]: p["schema"] for p in operation(doc, "GET", "/v1/jobs/{job_id}/events")["parameters"]}
    assert events["Last-Event-ID"]["pattern"] == events["after"]["pattern"]


def test_a_stale_table_is_refused() -> None:
    app = create_app(GatewaySettings())

    @app.get("/v1/undocumented")
    def undocumented() -> None: ...

    with pytest.raises(RuntimeError, match="undocumented"):
        document(app, GatewaySettings())


def problem_validator(doc: dict[str, Any], status: int) -> Any:
    schema = {**doc["components"]["schemas"]["Problem"], "properties": {
        **doc["components"]["schemas"]["Problem"]["properties"], "status": {"const": status}}}
    if status == 422:
        schema["required"] = [*schema["required"], "field"]
    return jsonschema_rs.validator_for(schema)


@pytest.mark.parametrize("problem", [
    invalid("seeds[2]", "Input should be a valid integer"),
    Problem(429, "the queue is full", headers={"Retry-After": "3"}, queued_nfe=1200),
    Problem(503, "no live worker serves: m", workers={"m": 0}, loading={"m": {"phase": "loading"}}),
    Problem(500, "generation failed: boom", job_id="abc"),
], ids=lambda p: str(p.status))
def test_problems_fit_the_schema(doc: dict[str, Any], problem: Problem) -> None:
    body = problem_response(problem).body
    problem_validator(doc, problem.status).validate(json.loads(body))


def test_answers_without_redis_fit_the_document(doc: dict[str, Any]) -> None:
    """Statuses the gateway gives before it needs Redis: their media type, schema and headers."""
    app = create_app(GatewaySettings(api_keys=["k"], max_steps=40, max_images=8, max_body_bytes=4096))
    key = {"Authorization": "Bearer k"}
    requests = {
        401: {"json": {}},
        413: {"content": b"{" + b" " * 5000 + b"}", "headers": key},
        422: {"json": {"seeds": [1.5]}, "headers": key},
        400: {"content": b"\xff", "headers": {**key, "Content-Type": "application/json"}},
    }

    async def ask() -> dict[int, httpx.Response]:
        transport = httpx.ASGITransport(app)  # no lifespan: no Redis
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return {status: await client.post("/v1/jobs", **kwargs) for status, kwargs in requests.items()}

    answers = anyio.run(ask)
    for status, response in answers.items():
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == PROBLEM_JSON
        problem_validator(doc, status).validate(response.json())
        assert "x-request-id" in response.headers
    assert answers[401].headers["www-authenticate"]
