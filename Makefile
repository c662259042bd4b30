# From a fresh clone: `make test` sets everything up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'

test: setup
	$(BIN)/python -m pytest -q

# Benchmarks (not part of the tests): pytest-benchmark groups, then the side-by-side script.
bench: setup
	$(BIN)/python -m pytest bench -q --benchmark-only
	$(BIN)/python bench/compare.py --quick

clean:
	rm -rf $(VENV) build *.egg-info dispatch/*.so ext/dispatch/*.c
