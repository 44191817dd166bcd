# One image for every eskit process; the command selects it, e.g.
#   esctl serve auth_svc | esctl serve user_svc | esctl relay auth_svc | esctl consume notify_svc
#   esctl db init | esctl keys rotate | esctl gateway render --out /kong/kong.yml

ARG PYTHON_VERSION=3.11
# The official Python image by default. tests/image builds on a stand-in made from Debian's
# packages (tools/image/base-image.sh) where Docker Hub is out of reach:
#   docker build --build-arg BASE_IMAGE="$(tools/image/base-image.sh)" .
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm
ARG UV_VERSION=0.13.9

FROM ${BASE_IMAGE} AS build
ARG UV_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON_DOWNLOADS=never
RUN pip install "uv==${UV_VERSION}"
WORKDIR /src
# Dependencies first: this layer is rebuilt only when the lock file changes.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project
# Then the code.
COPY README.md ./
COPY shared_contracts ./shared_contracts
COPY servicekit ./servicekit
COPY auth_svc ./auth_svc
COPY user_svc ./user_svc
COPY reporting_svc ./reporting_svc
COPY notify_svc ./notify_svc
COPY integration_svc ./integration_svc
COPY gateway ./gateway
COPY registry ./registry
COPY esctl ./esctl
COPY compose/kong.yml ./compose/kong.yml
RUN uv sync --frozen --no-dev --no-editable

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="eskit" \
      org.opencontainers.image.description="Event-sourced microservices: every eskit process"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOG_FORMAT=json \
    GATEWAY_CONFIG=/app/compose/kong.yml \
    NOTIFY_MAILDIR=/var/lib/eskit/maildir
# The paths a process writes, owned by eskit: a fresh volume mounted there starts as a copy of
# them (owner included), so `kong-config` can write /kong/kong.yml and notify_svc its maildir
# on a read-only root. The maildir comes with its tmp/ new/ cur/: Python's mailbox.Maildir
# creates them only along with a maildir that does not exist yet.
RUN groupadd --system --gid 10001 eskit \
    && useradd --system --uid 10001 --gid eskit --no-create-home --shell /usr/sbin/nologin eskit \
    && install -d -o 10001 -g 10001 -m 0755 /kong /var/lib/eskit /var/lib/eskit/maildir /var/lib/eskit/maildir/tmp /var/lib/eskit/maildir/new /var/lib/eskit/maildir/cur
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/compose/kong.yml /app/compose/kong.yml
USER 10001:10001
# Every process serves /health/live on its HTTP port; HEALTH_PORT says which. The default fits
# the default command (auth_svc); compose sets it for every process (tests/static checks it).
ENV HEALTH_PORT=8101
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['HEALTH_PORT']}/health/live\", timeout=2)"]
ENTRYPOINT ["esctl"]
CMD ["serve", "auth_svc"]
