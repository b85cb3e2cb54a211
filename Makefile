# The two commands of the README: `make up` runs the fleet, `make test` runs
# the tests. Each does its own set-up: virtual environment, install, local
# PostgreSQL and RabbitMQ started if stopped, database and migrations.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: up test lint install services db bench bench-smoke bench-tools chaos promtool

up: install services db
	@test -n "$$ADMIN_TOKEN" || test -f .admin-token || $(BIN)/python -c "import secrets; print(secrets.token_urlsafe(24))" > .admin-token
	@command -v rabbitmq-plugins >/dev/null 2>&1 && rabbitmq-plugins -q enable rabbitmq_management >/dev/null 2>&1 || true
	@echo "admin token: $${ADMIN_TOKEN:-$$(cat .admin-token)}   RabbitMQ management UI: http://127.0.0.1:15672 (guest/guest)"
	ADMIN_TOKEN="$${ADMIN_TOKEN:-$$(cat .admin-token)}" $(BIN)/payfleet up

test: install services promtool
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/python -m pytest

# The chaos suite at full scale (tests/chaos): RabbitMQ cut for 20 s, PostgreSQL
# for 10 s, more orders; `make test` runs the same scenarios in a short form.
chaos: install services
	CHAOS_SCALE=full $(BIN)/python -m pytest tests/chaos -s -q $(CHAOS_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy .

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

services:
	scripts/ensure-services.sh

db: install services
	scripts/create-database.sh
	$(BIN)/payfleet migrate

# The benchmark suite (bench/README.md). BENCH_ARGS passes options through,
# e.g. make bench BENCH_ARGS="--scenario ingest --json bench.json".
bench: install services bench-tools
	$(BIN)/python -m bench.run --scale full $(BENCH_ARGS)

# Every scenario, tiny: fails if one breaks, claims nothing about speed.
bench-smoke: install services bench-tools
	$(BIN)/python -m bench.run --scale smoke $(BENCH_ARGS)

# promtool (Debian's `prometheus` package) checks and unit-tests the alert
# rules (tests/test_alerts.py); installed where apt is available, and those
# tests skip where it is absent.
promtool:
	@command -v promtool >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		{ $(SUDO) apt-get install -y -q --no-install-recommends prometheus || \
		  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }; } || \
		echo "promtool could not be installed; the alert rule tests will be skipped"

bench-tools:
	@command -v wrk >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		{ $(SUDO) apt-get install -y -q wrk || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q wrk; }; }
	@command -v wrk >/dev/null 2>&1 || { echo "wrk is needed: install it (apt-get install wrk)"; exit 1; }
	@command -v rabbitmq-plugins >/dev/null 2>&1 && rabbitmq-plugins -q enable rabbitmq_management >/dev/null 2>&1 || true
