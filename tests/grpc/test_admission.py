"""The per-request work limit over gRPC: INVALID_ARGUMENT naming the field, before anything is queued."""

from __future__ import annotations

import grpc
import pytest

from service.grpc.stubs import service_pb2
from tests.grpc.conftest import Stack, spec, stream_request

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize(("fields", "field"), [
    ({"count": 256, "sampler": {"num_steps": 1000}}, "spec.count"),
    ({"seeds": list(range(256)), "sampler": {"num_steps": 1000}}, "spec.seeds"),
])
def test_a_job_above_the_per_request_limit_is_invalid_argument(stack: Stack, fields: dict, field: str) -> None:
    queued = stack.conn.get("edm:queued_nfe")
    for call in (lambda: stack.stub.Generate(service_pb2.GenerateRequest(spec=spec(**fields)), timeout=10),
                 lambda: list(stack.stub.GenerateStream(stream_request(**fields), timeout=10))):
        with pytest.raises(grpc.RpcError) as raised:
            call()
        error = raised.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert dict(error.trailing_metadata() or ())["edm-field"] == field  # type: ignore[attr-defined]
        assert error.details().startswith(f"{field}: 256 images x 1999 network evaluations = 511744")
        assert "limit of 200000 per request" in error.details()
    assert stack.conn.get("edm:queued_nfe") == queued
