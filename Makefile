# Two entry points from a fresh clone: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup test serve bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'

test: setup
	$(BIN)/python -m pytest -q

serve: setup
	$(BIN)/dispatch serve

bench: setup
	$(BIN)/python -m pytest bench -q --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info dispatch/*.so ext/dispatch/*.c
