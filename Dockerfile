# syntax=docker/dockerfile:1
# bucketsync as a container, e.g. a sidecar next to an application (examples/compose/,
# examples/kubernetes/).
#
#   docker build -t bucketsync .
#   docker run --read-only -v $PWD/bucketsync.toml:/etc/bucketsync/bucketsync.toml:ro \
#     -v $PWD/api_token:/run/secrets/bucketsync_api_token:ro -v bucketsync-state:/var/lib/bucketsync \
#     -p 9810:9810 bucketsync
#
# Two stages: `build` turns the source into a wheel and installs it with the locked, hash-checked
# dependencies (requirements.lock, wheels only) into a venv; the runtime stage copies that venv
# onto a clean slim base. No compiler is installed in either stage (every locked dependency ships
# a wheel), and the runtime runs as a fixed non-root UID.
#
# The base is pinned by digest; to move to a newer patch release:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   # then replace the digest below
# (The machines this was written on reach no container registry: check the digest resolves
# before the first build.)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock ./
RUN python -m venv /opt/bucketsync/venv \
 && /opt/bucketsync/venv/bin/pip install --require-hashes --only-binary=:all: --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/bucketsync/venv/bin/pip install --no-deps --no-index /wheels/bucketsync-*.whl \
 && /opt/bucketsync/venv/bin/bucketsync --version

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 bucketsync \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/bucketsync --no-create-home \
      --shell /usr/sbin/nologin bucketsync \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/bucketsync \
 && install -d -m 0755 /etc/bucketsync
COPY --from=build /opt/bucketsync/venv /opt/bucketsync/venv
# Config by file (BUCKETSYNC_CONFIG) or by env (BUCKETSYNC_SECTION__NAME__OPTION=...); secrets by
# *_file paths under /run/secrets (docker/compose secrets, Kubernetes Secret volumes).
# Inside a container the API listens beyond loopback, so the agent requires an API token: mount it
# at /run/secrets/bucketsync_api_token (or set BUCKETSYNC_AGENT__API_TOKEN_FILE elsewhere).
# DL3064 flags the name *_TOKEN_FILE: its value is a path to a mounted secret, not the secret.
# hadolint ignore=DL3064
ENV PATH=/opt/bucketsync/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BUCKETSYNC_CONFIG=/etc/bucketsync/bucketsync.toml \
    BUCKETSYNC_AGENT__LEDGER=/var/lib/bucketsync/bucketsync.db \
    BUCKETSYNC_AGENT__LOG_FORMAT=json \
    BUCKETSYNC_AGENT__LISTEN=0.0.0.0:9810 \
    BUCKETSYNC_AGENT__API_TOKEN_FILE=/run/secrets/bucketsync_api_token
USER 10001:10001
WORKDIR /var/lib/bucketsync
VOLUME ["/var/lib/bucketsync"]
EXPOSE 9810
# Liveness: the process and its HTTP server answer. Readiness (every dataset's permission probe
# passed) is `bucketsync healthcheck --ready`: compose healthchecks and Kubernetes readiness probes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 CMD ["bucketsync", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["bucketsync"]
CMD ["run"]
