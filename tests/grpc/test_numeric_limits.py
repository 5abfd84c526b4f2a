"""Over gRPC, the settings the sampler cannot compute are INVALID_ARGUMENT naming the field (the same
check as REST: service/validation.py, model/numerics.py), never INTERNAL."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from service.grpc.stubs import service_pb2
from tests.grpc.conftest import Stack, spec
from tests.grpc.test_errors import failure, trailers

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize(("sampler", "field"), [
    ({"sigma_max": 1e30}, "spec.sampler.sigma_max"),   # was a black PNG reported as succeeded
    ({"rho": 5e-324}, "spec.sampler.rho"),
    ({"rho": 0.001}, "spec.sampler.rho"),              # was INTERNAL (OverflowError)
    ({"rho": 0.2}, "spec.sampler.rho"),                # inside the bounds; the last step would be 0
    ({"sigma_min": 90.0}, "spec.sampler.sigma_min"),   # above the default sigma_max: steps would go up
])
def test_settings_the_sampler_cannot_compute_are_invalid_argument(stack: Stack, sampler: dict[str, Any],
                                                                   field: str) -> None:
    error = failure(lambda: stack.stub.Generate(service_pb2.GenerateRequest(spec=spec(seeds=[1], sampler=sampler)),
                                                timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(f"{field}: ") and trailers(error)["edm-field"] == field
