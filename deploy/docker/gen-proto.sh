#!/bin/sh
# Generate the gRPC stubs from proto/ during the image build, with the project's own build step.
#
# Usage: gen-proto.sh [SOURCE_DIR]   (run in the image's `source` stage, before the package is built)
#
# Before proto/ holds any .proto file this does nothing, so the same Dockerfile builds before and
# after the gRPC API exists. With .proto files it installs grpcio-tools in a throwaway venv and runs
# `make proto` (the project's target) if the Makefile has one; otherwise the package build itself
# must generate them, and check-install.py fails the image build if no *_pb2.py got installed.
set -eu
cd "${1:-.}"
protos=$(find proto -name '*.proto' 2>/dev/null | sort || true)
if [ -z "$protos" ]; then
    echo "gen-proto: no .proto files under proto/: no stubs to generate"
    exit 0
fi
echo "gen-proto: generating stubs for:" $protos
venv=/opt/protoc
python -m venv "$venv"
"$venv/bin/pip" install --quiet --no-cache-dir grpcio-tools
if make -n proto VENV="$venv" BIN="$venv/bin" PYTHON="$venv/bin/python" >/dev/null 2>&1; then
    make proto VENV="$venv" BIN="$venv/bin" PYTHON="$venv/bin/python"
else
    echo "gen-proto: the Makefile has no proto target; relying on the package build to generate the stubs" >&2
fi
