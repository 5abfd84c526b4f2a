"""Fail the image build early when the installed package is not what the image promises.

Usage: python check-install.py {gateway|worker} [SOURCE_DIR]

gateway: the REST app imports, and torch is neither installed nor imported (small image).
worker:  torch and the model code import.
both:    if SOURCE_DIR/proto holds .proto files, generated *_pb2.py stubs were installed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
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
        files = importlib.metadata.files("edm-serve") or []
        stubs = [str(f) for f in files if f.name.endswith("_pb2.py")]
        if not stubs:
            raise SystemExit("check-install: proto/ has .proto files but no generated *_pb2.py was installed "
                             "(the `make proto` target or the package build must generate them)")
        print("check-install: gRPC stubs:", ", ".join(sorted(stubs)))
    print(f"check-install: {kind} image OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
