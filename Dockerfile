# syntax=docker/dockerfile:1
#
# One image for every ciretry process: `ciretry serve ingest|classify|act` and `ciretry migrate`.
#   docker build -t ciretry:local .
#   docker run --rm --env-file compose/.env ciretry:local serve act
# Configuration (and every secret) comes from the environment at run time: nothing secret is
# copied into or set in this image. See docs/deployment.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtualenv with the dependencies, then the ciretry wheel ------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# Dependencies first (from pyproject's [project].dependencies), so that a change to the code alone
# reuses this layer instead of reinstalling every dependency.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && python -m venv /opt/ciretry \
    && /opt/ciretry/bin/pip install --no-cache-dir -r /tmp/requirements.txt

# The code: `pip wheel .` builds the one `ciretry` distribution (hatchling, see pyproject.toml),
# installed without its dependencies (already there).
COPY libs ./libs
COPY services ./services
RUN /opt/ciretry/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/ciretry/bin/pip install --no-cache-dir --no-deps /wheels/ciretry-*.whl \
    && /opt/ciretry/bin/ciretry --help > /dev/null

# --- runtime: slim Python, the virtualenv, an unprivileged user ---------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="ciretry" \
      org.opencontainers.image.description="Classify CI job failures and retry only what is worth retrying" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify it and volumes can be chowned.
RUN groupadd --system --gid 10001 ciretry \
    && useradd --system --uid 10001 --gid ciretry --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ciretry

COPY --from=builder /opt/ciretry /opt/ciretry

# Non-secret defaults only. In a container the services must listen on all interfaces.
ENV PATH=/opt/ciretry/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CIRETRY_HTTP_HOST=0.0.0.0 \
    CIRETRY_DATA_DIR=/tmp/ciretry

# Works with a read-only root filesystem: nothing is written outside /tmp.
WORKDIR /tmp
USER 10001:10001

# ingest 8080, classify 8081, act 8082 (CIRETRY_HTTP_PORT overrides).
EXPOSE 8080 8081 8082
# SIGTERM makes a service finish the batch in hand (drain) before it exits; give it
# at least the consumer ack wait (30 s) plus a margin (compose stop_grace_period,
# Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# No HEALTHCHECK here: the port differs per service; compose and Kubernetes probe
# /healthz and /readyz themselves.
ENTRYPOINT ["ciretry"]
CMD ["serve", "ingest"]
