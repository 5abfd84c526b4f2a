# syntax=docker/dockerfile:1
#
# edm-serve images, one Dockerfile, three targets:
#
#   docker build --target gateway    -t edm-serve-gateway .     # REST (+ gRPC) gateway, no torch
#   docker build --target worker     -t edm-serve-worker .      # GPU worker on a CUDA PyTorch base
#   docker build --target worker-cpu -t edm-serve-worker-cpu .  # CPU worker (CPU build of torch)
#
# docker-compose.yml builds them for you. All three run as the non-root user edm (uid 10001) and
# have a HEALTHCHECK. The gRPC stubs are generated from proto/ once, in the `source` stage, by
# the project's own `make proto` (a no-op while proto/ holds no .proto file).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_TORCH_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

# ---- source: the project tree with generated stubs ---------------------------------------------
FROM ${PYTHON_IMAGE} AS source
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN sh deploy/docker/gen-proto.sh /src

# ---- gateway-build: a venv with the package and its base dependencies (no `model` extra) -------
FROM ${PYTHON_IMAGE} AS gateway-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY pyproject.toml deploy/docker/requirements.py /build/
RUN python /build/requirements.py /build/pyproject.toml > /build/requirements.txt \
    && /opt/venv/bin/pip install -r /build/requirements.txt
COPY --from=source /src /src
RUN /opt/venv/bin/pip install --no-deps /src \
    && /opt/venv/bin/python /src/deploy/docker/check-install.py gateway /src

# ---- gateway: small, starts in a second ---------------------------------------------------------
FROM ${PYTHON_IMAGE} AS gateway
LABEL org.opencontainers.image.title="edm-serve gateway" \
      org.opencontainers.image.description="REST and gRPC gateway of edm-serve (no torch)"
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/edm edm \
    && mkdir -p /cache && chown edm:edm /cache
COPY --from=gateway-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDM_CACHE_DIR=/cache \
    EDM_HOST=0.0.0.0 \
    EDM_PORT=8000 \
    EDM_PROBE_PORT=8001 \
    EDM_GRPC_PORT=50051
USER 10001:10001
WORKDIR /home/edm
EXPOSE 8000 8001 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EDM_PROBE_PORT', '8001'), timeout=2)"]
ENTRYPOINT ["edm-serve"]
CMD ["gateway"]

# ---- worker: CUDA PyTorch base (torch comes with it) -------------------------------------------
FROM ${CUDA_TORCH_IMAGE} AS worker
LABEL org.opencontainers.image.title="edm-serve worker" \
      org.opencontainers.image.description="Batching GPU worker of edm-serve"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml deploy/docker/requirements.py /build/
# torch stays the base image's build (CUDA); the rest of the `model` extra is installed.
RUN python /build/requirements.py /build/pyproject.toml --extra model --exclude torch > /build/requirements.txt \
    && pip install -r /build/requirements.txt
COPY --from=source /src /src
RUN pip install --no-deps /src \
    && python /src/deploy/docker/check-install.py worker /src \
    && rm -rf /src
COPY --chmod=0755 deploy/docker/worker-entrypoint.sh /usr/local/bin/edm-worker-entrypoint
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/edm edm \
    && mkdir -p /models /var/lib/edm-gpu-locks /cache \
    && chown edm:edm /var/lib/edm-gpu-locks /cache
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDM_CACHE_DIR=/cache \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    EDM_DEVICE=cuda \
    EDM_METRICS_PORT=9101
USER 10001:10001
WORKDIR /home/edm
EXPOSE 9101
# The metrics port opens once the models are loaded and Redis answered: healthy = ready to work.
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('EDM_METRICS_PORT', '9101'), timeout=2)"]
ENTRYPOINT ["edm-worker-entrypoint"]
CMD ["edm-serve", "worker"]

# ---- worker-cpu: the same worker on the CPU build of torch --------------------------------------
FROM ${PYTHON_IMAGE} AS worker-cpu
LABEL org.opencontainers.image.title="edm-serve worker (CPU)" \
      org.opencontainers.image.description="Batching CPU worker of edm-serve"
ARG TORCH_SPEC=torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
COPY pyproject.toml deploy/docker/requirements.py /build/
RUN python /build/requirements.py /build/pyproject.toml --extra model --exclude torch > /build/requirements.txt \
    && /opt/venv/bin/pip install -r /build/requirements.txt
COPY --from=source /src /src
RUN /opt/venv/bin/pip install --no-deps /src \
    && /opt/venv/bin/python /src/deploy/docker/check-install.py worker /src \
    && rm -rf /src
COPY --chmod=0755 deploy/docker/worker-entrypoint.sh /usr/local/bin/edm-worker-entrypoint
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/edm edm \
    && mkdir -p /models /cache \
    && chown edm:edm /cache
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDM_CACHE_DIR=/cache \
    EDM_DEVICE=cpu \
    EDM_METRICS_PORT=9101
USER 10001:10001
WORKDIR /home/edm
EXPOSE 9101
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('EDM_METRICS_PORT', '9101'), timeout=2)"]
ENTRYPOINT ["edm-worker-entrypoint"]
CMD ["edm-serve", "worker"]
