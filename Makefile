# Two commands set up a fresh machine (Python 3.11 and make; PyPI only): `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNS ?= runs

.PHONY: setup demo test sweep cv bench ablation clean-venv

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

test: setup
	$(BIN)/python -m pytest -q

# The paper's five configurations, one split (PROFILE=1 adds the edge profile) and 5 patient-grouped folds.
sweep: setup
	$(BIN)/ichedge sweep --runs $(RUNS) --quiet $(if $(PROFILE),--profile)

cv: setup
	$(BIN)/ichedge sweep --cv --runs $(RUNS) --quiet

bench: setup
	$(BIN)/python bench/bench_sweep.py

ablation: setup
	$(BIN)/python bench/ablation_features.py

clean-venv:
	rm -rf $(VENV)
