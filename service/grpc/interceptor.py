"""One interceptor around every gRPC method: exceptions -> status codes, a log line and
edm_grpc_requests_total{method, code} per call (cancelled and expired calls included)."""

from __future__ import annotations

import inspect
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import grpc

from contract import logs
from service.grpc.errors import RpcFailure, to_failure
from service.metrics import GatewayMetrics

log = logging.getLogger("service.grpc")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class _Call:
    method: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    code: grpc.StatusCode | None = None  # None until the handler returns (or fails)


class Interceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: GatewayMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method.lstrip("/")
        given = dict(details.invocation_metadata or ()).get("x-request-id", "")
        request_id = given if isinstance(given, str) and _REQUEST_ID.match(given) else secrets.token_hex(8)
        kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler))
        for attr, make in kinds:
            behaviour = getattr(handler, attr)
            if behaviour is not None:
                # Streaming handlers are async generators, or coroutines that write with context.write
                # (the health service's Watch): each gets the wrapper of its kind.
                wrap = self._stream if inspect.isasyncgenfunction(behaviour) else self._unary
                return make(wrap(behaviour, method, request_id), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler

    def _unary(self, behaviour: Callable[[Any, Any], Awaitable[Any]], method: str,
               request_id: str) -> Callable[[Any, Any], Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            state = self._begin(method, request_id, context)
            token = logs.request_id.set(request_id)
            try:
                response = await behaviour(request, context)
            except grpc.aio.AbortError:
                state.code = _code_set(context)
                raise
            except Exception as error:
                await self._fail(state, context, error)
            finally:
                logs.request_id.reset(token)
            state.code = _code_set(context)
            return response
        return call

    def _stream(self, behaviour: Callable[[Any, Any], AsyncIterator[Any]], method: str,
                request_id: str) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            state = self._begin(method, request_id, context)
            token = logs.request_id.set(request_id)
            try:
                async for response in behaviour(request, context):
                    yield response
            except grpc.aio.AbortError:
                state.code = _code_set(context)
                raise
            except Exception as error:
                await self._fail(state, context, error)
            finally:
                with suppress(ValueError):  # closed by the garbage collector, in another context
                    logs.request_id.reset(token)
            state.code = _code_set(context)
        return call

    def _begin(self, method: str, request_id: str, context: grpc.aio.ServicerContext) -> _Call:
        state = _Call(method, request_id)
        context.add_done_callback(lambda _: self._record(state, context))
        return state

    async def _fail(self, state: _Call, context: grpc.aio.ServicerContext, error: Exception) -> None:
        failure = to_failure(error)
        if failure is None:
            log.exception("gRPC handler failed", extra={"method": state.method, "request_id": state.request_id})
            failure = RpcFailure(grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__})")
        state.code = failure.code
        if failure.trailers:
            context.set_trailing_metadata(failure.trailers)
        await context.abort(failure.code, failure.details)

    def _record(self, state: _Call, context: grpc.aio.ServicerContext) -> None:
        """At the end of the call, whichever way it ended."""
        code = state.code
        if code is None:
            remaining = context.time_remaining()
            code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
                else grpc.StatusCode.CANCELLED
        elapsed = time.perf_counter() - state.started
        self.metrics.grpc_requests.labels(state.method, code.name).inc()
        log.info("gRPC %s %s", state.method, code.name,
                 extra={"method": state.method, "code": code.name, "duration_s": round(elapsed, 4),
                        "request_id": state.request_id})


def _code_set(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The code the handler set (the health service sets NOT_FOUND this way), else OK."""
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
