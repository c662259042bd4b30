# From a fresh clone: `make test` sets everything up and runs the tests;
# `make serve` sets up and runs the daemon (embedded Redis under ./data, port 8080).
# The console's browser tests drive Debian's chromium headless: `make browser` (part of
# `make test`) installs it with apt-get when it is missing.
PYTHON ?= python3
CHROMIUM ?= /usr/bin/chromium
VENV   ?= .venv
BIN    := $(VENV)/bin
CORE   := $(wildcard ext/dispatch/*.pyx ext/dispatch/*.pxd ext/dispatch/*.pxi)

.PHONY: setup browser test screenshots serve bench clean

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

browser:
	@test -x $(CHROMIUM) || apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium) \
	    || { echo "error: the console tests need chromium at $(CHROMIUM); install it as root with" \
	              "'apt-get install -y chromium' (or set CHROMIUM=/path/to/chromium)" >&2; exit 1; }

test: setup browser
	DISPATCH_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -q

# The console's pages as the README shows them (docs/console/*.png), from its browser tests.
screenshots: setup browser
	DISPATCH_CHROMIUM=$(CHROMIUM) DISPATCH_CONSOLE_SHOTS=docs/console $(BIN)/python -m pytest -q tests/test_console.py

# Benchmarks (not part of the tests): pytest-benchmark groups, then the side-by-side script.
bench: $(VENV)/.installed-bench
	$(BIN)/python -m pytest bench -q --benchmark-only
	$(BIN)/python bench/compare.py --quick

serve: setup
	$(BIN)/dispatch serve

clean:
	rm -rf $(VENV) build *.egg-info dispatch/*.so ext/dispatch/*.c
