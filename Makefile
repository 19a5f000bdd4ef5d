# consumerd: `make run` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EMULATOR_PACKAGES := google-cloud-cli-pubsub-emulator openjdk-17-jre-headless
CONTAINER_PACKAGES := podman runc conmon catatonit fuse-overlayfs slirp4netns uidmap tini mmdebstrap containernetworking-plugins
# Every podman call of the project (here and in tests/container) reads this file only.
export CONTAINERS_CONF := $(CURDIR)/deploy/container/containers.conf
PYTEST_ARGS ?=

BENCH_STAMP := $(VENV)/.installed-bench
DOCS_STAMP := $(VENV)/.installed-docs
# import-linter in a venv of its own: it brings rich, which structlog imports whenever it is
# installed, and the daemon run from .venv (tests, make bench) must carry what production carries.
LINT_VENV := build/lint-venv
LINT_STAMP := $(LINT_VENV)/.installed

.PHONY: help venv emulator monitoring redis systemd-sandbox deb-tools wheel deb lock install-system run test test-examples lint unit integration system chaos bench bench-quick fleet docs docs-serve container-tools image test-container clean

help:
	@echo "make run    - start a local Pub/Sub emulator and the daemon with demo tasks (Ctrl-C stops)"
	@echo "make test   - unit and integration tests against the real emulator"
	@echo "make lint   - ruff (lint and format) and mypy, as CI runs them"
	@echo "make docs   - the documentation site, built strictly into site/ (references generated from the code)"
	@echo "make docs-serve - the same site with live reload on http://127.0.0.1:8000 (loopback only)"
	@echo "make unit   - only the fast unit tests"
	@echo "make test-examples - examples/project's tests in a fresh venv with only the wheel ([testing]) and the example"
	@echo "make wheel / make install-system - build a wheel / install as a systemd service (deploy/install.sh)"
	@echo "make deb   - dist/consumerd_VERSION_ARCH.deb (dh-virtualenv, from deploy/requirements.lock), checked by lintian"
	@echo "make lock  - refresh deploy/requirements.lock (pinned versions with their hashes)"
	@echo "make bench  - consumerd against the alternatives (~20 min); make bench-quick (< 3 min)"
	@echo "make chaos  - the 20,000-message fault soak; prints the no-message-lost table"
	@echo "make fleet  - three hosts (systemd guests with the .deb) on one subscription: throughput, one killed (~2 min)"
	@echo "make image  - dist/consumerd_VERSION.oci.tar: the OCI image (Debian base, locked wheels), podman without a registry"
	@echo "make test-container - the image under podman against the emulator: drain, kill, a fleet of three, sandbox (~3 min)"

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

# redis-server for the fleet-wide rate limit tests, which start their own on loopback; policy-rc.d
# keeps apt from starting the packaged service.
redis:
	@if ! command -v redis-server >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing redis-server..."; \
	  guard=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; guard=1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; \
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

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

# debhelper, dh-virtualenv and lintian from Debian, only if missing.
deb-tools:
	@if ! command -v dpkg-buildpackage >/dev/null || ! command -v lintian >/dev/null || ! dpkg -s dh-virtualenv >/dev/null 2>&1; then \
	  echo "installing debhelper, dh-virtualenv and lintian..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    build-essential debhelper dh-virtualenv lintian python3 python3-venv; \
	fi

# The package is built from a copy of the tree with deploy/debian as its debian/ directory.
deb: deb-tools docs
	rm -rf build/deb && mkdir -p build/deb/consumerd dist
	tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
	  --exclude='__pycache__' --exclude=./.mypy_cache --exclude=./.ruff_cache -cf - . | tar -C build/deb/consumerd -xf -
	cp -r deploy/debian build/deb/consumerd/debian
	cp systemd/consumerd.service systemd/consumerd@.service build/deb/consumerd/debian/
	printf 'consumerd (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- consumerd maintainers <consumerd@example.org>  %s\n' \
	  "$(VERSION)" "$(VERSION)" "$$(date -R)" > build/deb/consumerd/debian/changelog
	cd build/deb/consumerd && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	mv build/deb/consumerd_$(VERSION)_*.deb dist/
	lintian --fail-on error --info dist/consumerd_$(VERSION)_*.deb
	@ls dist/consumerd_$(VERSION)_*.deb

# Pinned versions with their hashes, for the .deb and deploy/install.sh (pip --require-hashes).
lock:
	rm -rf build/lockenv && $(PYTHON) -m venv build/lockenv
	build/lockenv/bin/pip install --quiet --disable-pip-version-check pip-tools
	build/lockenv/bin/pip-compile --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
	  --output-file deploy/requirements.lock pyproject.toml

run: venv emulator
	$(PY) -m harness.devrun --config config/dev.toml

# The system tests (guests booting, apt, a fleet) mostly wait, and so do the integration tests: they
# run side by side, each suite in order (guests share this machine's loopback: one at a time).
# Exit status 5 (nothing collected, e.g. PYTEST_ARGS=-k for one suite only) is not a failure.
# Integration tests that mostly wait (leases, drains, outages): a second pytest process runs them
# beside the rest, and the system tests beside both; each process starts its own emulator. The
# probe flood stays in the first: it times probes under its own flood, so it must not share the
# cores with the chaos soak (it did once here: a probe took 1.17 s against its 1 s bound).
WAITING_TESTS := $(addprefix tests/integration/,test_flow.py test_code_reload.py \
	test_outage.py test_shutdown.py test_hardening.py test_delivery.py)

test: venv emulator systemd-sandbox monitoring redis
	@$(PY) -m pytest -q -p no:cacheprovider --durations=8 tests/system $(PYTEST_ARGS) > .test-system.log 2>&1 & system=$$!; \
	$(PY) -m pytest -q -p no:cacheprovider --durations=8 $(WAITING_TESTS) $(PYTEST_ARGS) > .test-waiting.log 2>&1 & waiting=$$!; \
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests/unit tests/integration $(addprefix --ignore=,$(WAITING_TESTS)) $(PYTEST_ARGS); rest=$$?; \
	wait $$waiting; waiting_rc=$$?; wait $$system; system_rc=$$?; \
	echo "==== the waiting integration tests (ran alongside; exit $$waiting_rc) ===="; cat .test-waiting.log; \
	echo "==== tests/system (ran alongside; exit $$system_rc) ===="; cat .test-system.log; \
	[ $$rest = 5 ] && rest=0; [ $$waiting_rc = 5 ] && waiting_rc=0; [ $$system_rc = 5 ] && system_rc=0; \
	exit $$(( rest || waiting_rc || system_rc ))

# What a user's project gets: a fresh venv with the wheel and its `testing` extra, nothing of this
# checkout, then the example's own tests (run_task unit tests, end-to-end tests through the plugin).
EXAMPLES_VENV := build/examples-venv
test-examples: wheel emulator
	rm -rf $(EXAMPLES_VENV) && $(PYTHON) -m venv $(EXAMPLES_VENV)
	$(EXAMPLES_VENV)/bin/pip install --quiet --disable-pip-version-check 'dist/consumerd-$(VERSION)-py3-none-any.whl[testing]' ./examples/project
	cd examples/project && ../../$(EXAMPLES_VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=5

lint: venv $(LINT_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	PYTHONPATH=$(CURDIR) $(LINT_VENV)/bin/lint-imports --no-cache  # the layering contracts in pyproject.toml
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_layout.py  # no cycles, pure policy, no module over 400 lines
	$(PY) deploy/kubernetes/validate.py  # every kustomization rendered, each object checked against its schema
	$(MAKE) --no-print-directory docs  # a page, link or generated reference that does not build fails here

unit: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

integration: venv emulator monitoring redis
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

fleet: venv emulator systemd-sandbox deb
	$(PY) -m bench.fleet

# podman (with runc, see deploy/container/containers.conf) and mmdebstrap from Debian, only if missing.
container-tools:
	@missing=; for p in $(CONTAINER_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q ' installed$$' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The base root (mmdebstrap, cached as localhost/consumerd-base:bookworm), the locked wheelhouse, podman build
# --network=none, podman save: deploy/container/build.sh. Prints the archive's size.
image: venv container-tools
	PY=$(PY) deploy/container/build.sh

# -s: the tests print their figures (image size, stop-to-exit time, messages lost).
test-container: venv emulator image
	$(PY) -m pytest -q -s -p no:cacheprovider --durations=8 tests/container $(PYTEST_ARGS)

$(LINT_STAMP):
	rm -rf $(LINT_VENV) && $(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install --quiet --disable-pip-version-check 'import-linter>=2.1'
	touch $@

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,docs]'
	touch $@

# mkdocs-material with the hook docs/hooks/reference.py, which fills the configuration and command-line
# references from the settings model and the argument parser. NO_MKDOCS_2_WARNING quiets the theme's
# banner about its successor, printed on every build.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict -a 127.0.0.1:8000

clean:
	rm -rf $(VENV) build dist site *.egg-info
