# The two commands a fresh machine needs: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ./spinbroker-data
ADDR   ?= 127.0.0.1:7878

.PHONY: serve test lint typecheck unit bench debian-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install: the package and its runtime dependencies.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# Development install: runtime plus test, lint and type-check tools.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/spinbroker serve --data-dir $(DATA) --addr $(ADDR)

# Debian packages the test suite drives for real (qemu for the emulation agent).
debian-deps:
	@bash tools/install-debian-deps.sh

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check spinbroker agents tests bench tools
	$(BIN)/ruff format --check spinbroker agents tests bench tools

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

unit: $(VENV)/.installed-dev
	$(BIN)/pytest -q

test: debian-deps lint typecheck unit

bench: debian-deps $(VENV)/.installed-dev
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
