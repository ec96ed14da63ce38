# Two commands set up a fresh machine (Python 3.11 and make; PyPI only): `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNS ?= runs

.PHONY: setup demo test sweep cv bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The main job: the best paper configuration on the bundled CT-ICH, one patient-level split.
demo: setup
	$(BIN)/ichedge train --size 160 --alpha 0.35 --runs $(RUNS)

test: setup
	$(BIN)/python -m pytest -q

# The paper's five configurations, one split, and with 5 patient-grouped folds (README tables).
sweep: setup
	$(BIN)/ichedge sweep --runs $(RUNS) --quiet

cv: setup
	$(BIN)/ichedge sweep --cv --runs $(RUNS) --quiet

bench: setup
	$(BIN)/python bench/bench_sweep.py

clean-venv:
	rm -rf $(VENV)
