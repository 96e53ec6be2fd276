# syntax=docker/dockerfile:1
# macp-router image: `macp-router serve`, configured by MACP_ROUTER_* environment variables.
#   docker build -t macp-router:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9090:9090 \
#     -e MACP_ROUTER_PODS=pod-a=10.0.0.5:50051,pod-b=10.0.0.6:50051 macp-router:0.1.0
# Ports: 50051 gRPC (macp.v1.MACPRuntimeService, router.v1 admin, grpc.health.v1),
#        9090 HTTP (/metrics, /healthz liveness, /readyz readiness with JSON detail, / status
#        page). The ACP front door listens where MACP_ROUTER_ACP_LISTEN says (publish it too).
# Extras installed (build argument EXTRAS, default "acp,otel"): acp = the ACP front door's
# dependencies (`serve --acp-listen`), otel = traces (`serve --otel`, OTEL_* variables).
#   docker build --build-arg EXTRAS=acp -t macp-router:0.1.0 .    # without tracing
# The load-test harness (loadtest/) is not in the build context, so not in the image.
# tests/test_deploy.py lints this file with hadolint and replays the build stage's COPY and
# `pip install` steps in a fresh venv: keep the install in one `RUN ... pip install` line.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
ARG EXTRAS=acp,otel
# Only what the wheel needs (see .dockerignore): no tests, no test extra, no load tests.
COPY pyproject.toml README.md ./
COPY router/ router/
RUN /opt/venv/bin/pip install --no-cache-dir ".[${EXTRAS}]"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 macp \
    && useradd --system --uid 10001 --gid macp --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin macp
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MACP_ROUTER_LISTEN=0.0.0.0:50051 \
    MACP_ROUTER_METRICS_LISTEN=0.0.0.0:9090
# Numeric user so Kubernetes can verify runAsNonRoot.
USER 10001:10001
EXPOSE 50051 9090
# Docker only: Kubernetes ignores it and uses the httpGet probes in
# k8s/base/router-deployment.yaml, and an OCI-format build (buildah/podman default) drops it
# (the OCI image spec has no health check; build with --format docker to keep it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('MACP_ROUTER_METRICS_LISTEN', ':9090').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
ENTRYPOINT ["macp-router", "serve"]
