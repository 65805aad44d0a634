# Two commands: `make demo` and `make test`. Each creates .venv when missing, installs the
# package into it, fetches the data it needs, and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test lint typecheck unit bench wheel-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,art,ray]'
	rm -f $(VENV)/.installed-*
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; installed here when apt-get is usable.
$(FMNIST_DIR)/train-images-idx3-ubyte.gz:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'"; fi

data: setup $(FMNIST_DIR)/train-images-idx3-ubyte.gz
	$(PY) -m fmdefense data fetch --dataset mnist fmnist orl

lint: setup
	$(VENV)/bin/ruff check $(wildcard src tests benchmarks)
	$(VENV)/bin/ruff format --check $(wildcard src tests benchmarks)
	$(VENV)/bin/lint-imports --no-cache

typecheck: setup
	$(VENV)/bin/mypy

unit: data
	$(VENV)/bin/pytest

test: lint typecheck unit

demo: data
	$(PY) -m fmdefense evaluate classifier --dataset mnist fmnist orl
	$(PY) -m fmdefense reproduce --dataset mnist --profile quick

bench: data
	$(PY) benchmarks/morph_throughput.py
	$(PY) benchmarks/defense_cost.py
	$(PY) benchmarks/serving.py

# Build the wheel, install it into a fresh venv outside the repo, run the installed CLI and
# fmdefense.pretrained("mnist") there (tests/test_wheel.py; `make test` runs it too). An
# installed fmdefense finds the shipped weights through $FMDEFENSE_WEIGHTS (they are not
# package data) or ./weights.
wheel-check: setup
	$(VENV)/bin/pytest tests/test_wheel.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
