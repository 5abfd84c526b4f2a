"""Fail the image build early when the installed package is not what the image promises.

Usage: python check-install.py {gateway|worker} [SOURCE_DIR]

gateway: the REST app imports, and torch is neither installed nor imported (small image).
worker:  torch and the model code import.
both:    if SOURCE_DIR/proto holds .proto files, their generated stubs were installed and import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    kind = argv[0]
    source = Path(argv[1]) if len(argv) > 1 else None
    importlib.import_module("service.cli")
    if kind == "gateway":
        importlib.import_module("service.app")
        importlib.import_module("service.main")
        if importlib.util.find_spec("torch") is not None or "torch" in sys.modules:
            raise SystemExit("check-install: torch is installed in the gateway image")
    elif kind == "worker":
        importlib.import_module("worker.main")
        importlib.import_module("worker.runner")
        importlib.import_module("model.networks")
    else:
        raise SystemExit(f"check-install: unknown image kind {kind!r}")
    if source is not None and any((source / "proto").rglob("*.proto")):
        # `make proto` writes proto/edm/v1/x.proto's stubs as service.grpc_gen.edm.v1.x_pb2(_grpc). Importing
        # them (not listing the distribution's files, which an editable install does not record) also
        # checks that the installed protobuf and grpcio runtimes accept the generated code.
        stubs = []
        for proto in sorted((source / "proto").rglob("*.proto")):
            module = "service.grpc_gen." + ".".join(proto.relative_to(source / "proto").with_suffix("").parts)
            for suffix in ("_pb2", "_pb2_grpc"):
                try:
                    stubs.append(importlib.import_module(module + suffix).__file__)
                except ImportError as error:
                    raise SystemExit(f"check-install: proto/ has .proto files but {module + suffix} was not "
                                     f"installed or does not import ({error}); `make proto` generates it") from None
        print("check-install: gRPC stubs:", ", ".join(str(s) for s in stubs))
    print(f"check-install: {kind} image OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
