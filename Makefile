# consumerd: `make run` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EMULATOR_PACKAGES := google-cloud-cli-pubsub-emulator openjdk-17-jre-headless
PYTEST_ARGS ?=

BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: help venv emulator monitoring systemd-sandbox wheel install-system run test lint unit integration system chaos bench bench-quick clean

help:
	@echo "make run    - start a local Pub/Sub emulator and the daemon with demo tasks (Ctrl-C stops)"
	@echo "make test   - unit and integration tests against the real emulator"
	@echo "make lint   - ruff (lint and format) and mypy, as CI runs them"
	@echo "make unit   - only the fast unit tests"
	@echo "make wheel / make install-system - build a wheel / install as a systemd service (deploy/install.sh)"
	@echo "make bench  - consumerd against the alternatives (~20 min); make bench-quick (< 3 min)"
	@echo "make chaos  - the 20,000-message fault soak; prints the no-message-lost table"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(STAMP)

# The emulator is a Debian package on these machines; install it (and Java) only if missing.
emulator:
	@if ! command -v gcloud >/dev/null || ! command -v java >/dev/null || \
	    [ ! -x "$$(dirname "$$(dirname "$$(readlink -f "$$(command -v gcloud)")")")/platform/pubsub-emulator/bin/cloud-pubsub-emulator" ]; then \
	  echo "installing the Pub/Sub emulator and Java..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(EMULATOR_PACKAGES); \
	fi

# Prometheus and promtool for the monitoring tests. policy-rc.d keeps apt from starting the
# packaged service (it would listen on every interface); the tests start their own on loopback.
monitoring:
	@if ! command -v promtool >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing prometheus (promtool)..."; \
	  guard=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; guard=1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	  [ -z "$$guard" ] || rm -f /usr/sbin/policy-rc.d; \
	fi

# systemd-nspawn boots the real systemd the tests in tests/system run the unit under.
systemd-sandbox:
	@if ! command -v systemd-nspawn >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing systemd-container..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd-container; \
	fi

wheel: venv
	$(PY) -m pip wheel --quiet --no-deps -w dist .
	@ls dist/*.whl

install-system:
	bash deploy/install.sh

run: venv emulator
	$(PY) -m consumerd.devrun --config config/dev.toml

test: venv emulator systemd-sandbox monitoring
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

integration: venv emulator monitoring
	$(PY) -m pytest -q -p no:cacheprovider tests/integration

system: venv emulator systemd-sandbox
	$(PY) -m pytest -q -p no:cacheprovider tests/system

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@

chaos: venv emulator
	$(PY) -m chaos --messages 20000 --out chaos/latest.json

bench: $(BENCH_STAMP) emulator
	$(PY) -m bench

bench-quick: $(BENCH_STAMP) emulator
	$(PY) -m bench --quick --out bench/results/quick.json

clean:
	rm -rf $(VENV) build *.egg-info
