# Two commands set up a fresh machine (Python 3.11 and make; PyPI only): `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNS ?= runs
# The full-resolution CT-ICH (650x650 JPEGs) for inputs above the bundle's 160x160.
CT_ICH ?= ../shared/data/ct-ich/labels.csv
SEED ?= 0
# The second hospital (non-commercial licence: read from there, never bundled).
PHE_SICH ?= ../shared/data/phe-sich/labels.csv

.PHONY: setup browser postgres demo test test-fast sweep cv context best crosssite robustness tune bench ablation load clean-venv

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The main job on the bundled CT-ICH: train and evaluate the best paper configuration with
# ImageNet weights on one patient-level split, then export it for microcontrollers and profile it.
demo: setup
	$(BIN)/ichedge train --size 160 --alpha 0.35 --runs $(RUNS)
	run=$$(ls -td $(RUNS)/*-160px-a0.35-gray/ | head -n 1) && \
	$(BIN)/ichedge export $$run && \
	$(BIN)/ichedge profile $$run

# Headless Chromium from Debian for the end-to-end browser test.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

# PostgreSQL from Debian: the tests start a throwaway server of their own from its binaries (tests/postgres.py).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql; }

test: setup browser postgres
	$(BIN)/python -m pytest -q

# Unit tests only: no model is trained (tests using a trained model are marked integration).
test-fast: setup postgres
	$(BIN)/python -m pytest -q -m "not integration"

# The paper's five configurations, one split (PROFILE=1 adds the edge profile) and 5 patient-grouped folds.
sweep: setup
	$(BIN)/ichedge sweep --runs $(RUNS) --quiet $(if $(PROFILE),--profile)

cv: setup
	$(BIN)/ichedge sweep --cv --runs $(RUNS) --quiet

# Issue 2's previous round: 224x224 and 160x160 from full-resolution images with the paper head and
# the slice-context stage, 5 patient-grouped folds; then the frozen-feature ablations behind both.
context: setup
	$(BIN)/ichedge sweep --cv --data $(CT_ICH) --grid 224x0.35,160x0.35 --context --runs $(RUNS) --quiet
	$(BIN)/python bench/ablation_context.py $(CT_ICH)

# Issue 2's accuracy target: 224x224 from full-resolution images, the multilevel logistic head and
# slice context, 5 patient-grouped folds (SEED picks another fold assignment).
best: setup
	$(BIN)/ichedge sweep --cv --data $(CT_ICH) --grid 224x0.35 --head multilevel --context --seed $(SEED) \
	  --runs $(RUNS) --quiet

# Issue 15's cross-site protocol for `make demo`'s and `make best`'s configurations: trained on CT-ICH
# only and on CT-ICH + PHE-SICH, tested on each site's held-out patients (5 patient folds).
crosssite: setup
	$(BIN)/ichedge crosssite --data $(CT_ICH) --other $(PHE_SICH) --size 160 --alpha 0.35 --seed $(SEED) --runs $(RUNS) --quiet
	$(BIN)/ichedge crosssite --data $(CT_ICH) --other $(PHE_SICH) --size 224 --alpha 0.35 --head multilevel --context \
	  --seed $(SEED) --runs $(RUNS) --quiet

# How firm `make best` is: taps chosen by nested CV, and thresholds from out-of-fold scores (fold seeds 0-4).
robustness: setup
	$(BIN)/python bench/nested_selection.py $(CT_ICH)
	$(BIN)/python bench/threshold_protocol.py $(CT_ICH)

# Issue 17's search: the best int8 model within a Cortex-M4 board's 256 KiB RAM and 512 KiB flash, 30 trials
# (alpha 1.0 from the shared ImageNet file), the chosen model trained, exported and profiled.
WEIGHTS_DIR ?= ../shared/weights
tune: setup
	$(BIN)/ichedge tune --ram $(or $(RAM),256KiB) --flash $(or $(FLASH),512KiB) --trials 30 --weights-dir $(WEIGHTS_DIR) \
	  --seed $(SEED) --apply --runs $(RUNS) --quiet

bench: setup
	$(BIN)/python bench/bench_sweep.py

ablation: setup
	$(BIN)/python bench/ablation_features.py

# 8 clients, 1,000 requests against `ichedge serve` on loopback (RUN: an exported run folder).
load: setup
	$(BIN)/python bench/load_service.py $(RUN)
	$(BIN)/python bench/load_service.py $(RUN) --no-heatmap

clean-venv:
	rm -rf $(VENV)
