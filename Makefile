# Two commands do all the set-up on a fresh machine: `make up` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.synced

.PHONY: up gateway-tools image-tools asyncapi-cli broker-plugins test test-image lint typecheck unit integration bench db-init clean audit

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --compile-bytecode --python $(PYTHON) --quiet
	touch $(STAMP)

venv: $(STAMP)

## The local gateway (HAProxy), decK (validates kong.yml) and kubectl (renders kustomize).
gateway-tools:
	command -v haproxy >/dev/null && command -v deck >/dev/null && command -v kubectl >/dev/null \
	  && command -v promtool >/dev/null \
	  || (apt-get update -qq && apt-get install -y -qq haproxy deck kubectl prometheus)

## Debian's Docker engine and debootstrap, for tests/image (it builds the image and runs every
## process from it; it skips, saying why, where dockerd cannot start). Root only: elsewhere the
## test says what is missing.
image-tools:
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null && exit 0; \
	[ "$$(id -u)" = 0 ] || exit 0; \
	(apt-get update -qq && apt-get install -y -qq --no-install-recommends docker.io debootstrap) \
	  || echo "image-tools: docker.io or debootstrap could not be installed; tests/image will skip"

## The official AsyncAPI CLI, pinned in tools/asyncapi/ (validates the contracts' AsyncAPI
## document); Node.js and npm from Debian where missing. Install scripts off: the CLI needs
## none, and one of them only reports the install.
ASYNCAPI_CLI := tools/asyncapi/node_modules/.bin/asyncapi
$(ASYNCAPI_CLI): tools/asyncapi/package.json tools/asyncapi/package-lock.json
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	cd tools/asyncapi && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $(ASYNCAPI_CLI)

asyncapi-cli: $(ASYNCAPI_CLI)

## RabbitMQ's management HTTP API (port 15672): `esctl db init` writes the consumer queues'
## policies through it. Enabled on the local node (offline if it is not running yet).
broker-plugins:
	@command -v rabbitmq-plugins >/dev/null || exit 0; \
	rabbitmq-plugins -q is_enabled rabbitmq_management >/dev/null 2>&1 \
	  || rabbitmq-plugins -q enable rabbitmq_management >/dev/null \
	  || rabbitmq-plugins -q enable --offline rabbitmq_management
	@# The native stream protocol (port 5552): replays read events.history over it.
	@command -v rabbitmq-plugins >/dev/null || exit 0; \
	rabbitmq-plugins -q is_enabled rabbitmq_stream >/dev/null 2>&1 \
	  || rabbitmq-plugins -q enable rabbitmq_stream >/dev/null \
	  || rabbitmq-plugins -q enable --offline rabbitmq_stream

## Run the whole stack on this machine (Ctrl-C stops it).
up: $(STAMP) gateway-tools broker-plugins
	$(BIN)/esctl up

db-init: $(STAMP) broker-plugins
	$(BIN)/esctl db init

## Lint, type-check, check service boundaries, then run every test.
test: $(STAMP) gateway-tools asyncapi-cli broker-plugins image-tools lint typecheck
	@# The chaos cases run on private servers of their own, beside the rest of the suite;
	@# then, in the same background stream, the image is built and every process run from it.
	@rm -f .chaos.log .image.log; \
	($(BIN)/pytest -q -p no:cacheprovider tests/chaos > .chaos.log 2>&1; echo $$? > .chaos.rc; \
	 IMAGE_TEST=1 $(BIN)/pytest -q -p no:cacheprovider -m image tests/image -rs > .image.log 2>&1; \
	 echo $$? > .image.rc) & \
	$(BIN)/pytest -q -p no:cacheprovider --ignore=tests/chaos --ignore=tests/image; rest=$$?; wait; \
	echo "--- tests/chaos"; cat .chaos.log; chaos=$$(cat .chaos.rc); \
	echo "--- tests/image"; cat .image.log; image=$$(cat .image.rc); \
	rm -f .chaos.log .chaos.rc .image.log .image.rc; \
	[ $$rest -eq 0 ] && [ $$chaos -eq 0 ] && [ $$image -eq 0 ]

## The image, for real: a stand-in base from Debian, the build, every process run from it.
test-image: $(STAMP) image-tools broker-plugins
	IMAGE_TEST=1 $(BIN)/pytest -q -p no:cacheprovider -m image tests/image -s

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

## pip-audit on uv.lock (needs its vulnerability service; fails, saying why, when unreachable).
audit: $(STAMP)
	$(BIN)/python -m tests.security.audit_dependencies

## Benchmarks (not part of `make test`): each prints JSON with its baseline from the same run.
bench: $(STAMP) broker-plugins
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
