"""The generated edm.v1 modules (service/grpc_gen/, written by `make proto` from proto/edm/v1/)."""

from __future__ import annotations

try:
    from service.grpc_gen.edm.v1 import generation_service_pb2 as service_pb2
    from service.grpc_gen.edm.v1 import generation_service_pb2_grpc as service_grpc
    from service.grpc_gen.edm.v1 import job_pb2
except ImportError as error:  # a checkout where nobody ran the build step yet
    raise ImportError("the gRPC stubs are missing: run `make proto` (it generates service/grpc_gen/ "
                      "from proto/edm/v1/*.proto)") from error

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name

__all__ = ["SERVICE_NAME", "job_pb2", "service_grpc", "service_pb2"]
