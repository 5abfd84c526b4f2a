"""Exceptions -> gRPC status codes: the same failures the REST API answers with problem+json.

Handlers raise (RpcFailure, the REST layer's Problem, a pydantic ValidationError, a RedisError);
the interceptor turns each into a status code, a message naming the field where there is one,
and trailing metadata (`edm-field`, `retry-after`).
"""

from __future__ import annotations

import grpc
import redis
from pydantic import ValidationError
from redis.exceptions import OutOfMemoryError

from service.errors import Problem
from service.grpc.convert import InvalidField, grpc_field, validation_error

# HTTP status of a Problem -> gRPC code (https://grpc.github.io/grpc/core/md_doc_http-grpc-status-mapping.html,
# read backwards, plus what each of our problems means).
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
          406: grpc.StatusCode.INVALID_ARGUMENT, 409: grpc.StatusCode.FAILED_PRECONDITION,
          410: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
          422: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
          500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE}

Trailers = tuple[tuple[str, str], ...]


class RpcFailure(Exception):
    """Raise in a handler to end the call with this status."""

    def __init__(self, code: grpc.StatusCode, details: str, *, field: str | None = None,
                 trailers: Trailers = ()):
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailers = trailers + ((("edm-field", field),) if field else ())


def invalid_argument(field: str, message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field=field)


def to_failure(error: Exception) -> RpcFailure | None:
    """The status for an exception we know; None for a bug (the caller logs it, INTERNAL)."""
    if isinstance(error, RpcFailure):
        return error
    if isinstance(error, InvalidField):
        return invalid_argument(error.field, error.message)
    if isinstance(error, ValidationError):
        return invalid_argument(*validation_error(error))
    if isinstance(error, Problem):
        return _from_problem(error)
    if isinstance(error, redis.RedisError):
        full = isinstance(error, OutOfMemoryError)  # maxmemory reached under noeviction (see service/errors.py)
        return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.UNAVAILABLE,
                          "the job store (Redis) is full; retry later" if full
                          else "the job store (Redis) is unreachable; retry shortly", trailers=(("retry-after", "1"),))
    return None


def _from_problem(problem: Problem) -> RpcFailure:
    code = _CODES.get(problem.status, grpc.StatusCode.UNKNOWN)
    trailers: Trailers = ()
    if "Retry-After" in problem.headers:
        trailers += (("retry-after", problem.headers["Retry-After"]),)
    if problem.field is None:
        return RpcFailure(code, problem.detail, trailers=trailers)
    field = grpc_field(problem.field)
    errors = problem.extra.get("errors") or []
    message = errors[0]["message"] if errors else problem.detail
    return RpcFailure(code, message if message.startswith(field) else f"{field}: {message}", field=field,
                      trailers=trailers)
