# From a fresh clone: `make test` sets everything up and runs the tests;
# `make serve` sets up and runs the daemon (embedded Redis under ./data, port 8080).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORE   := $(wildcard ext/dispatch/*.pyx ext/dispatch/*.pxd ext/dispatch/*.pxi)

.PHONY: setup test serve bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# pip runs again only when the packaging or the compiled core's sources changed.
$(VENV)/.installed: pyproject.toml setup.py $(CORE) | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,loadtest]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,loadtest,bench]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

# Benchmarks (not part of the tests): pytest-benchmark groups, then the side-by-side script.
bench: $(VENV)/.installed-bench
	$(BIN)/python -m pytest bench -q --benchmark-only
	$(BIN)/python bench/compare.py --quick

serve: setup
	$(BIN)/dispatch serve

clean:
	rm -rf $(VENV) build *.egg-info dispatch/*.so ext/dispatch/*.c
