# psych-cds: `make demo` runs everything on this machine, `make test` proves it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# onnxruntime-gpu where a GPU answers, the CPU build otherwise (never both in one venv).
EXTRA := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo gpu; else echo cpu; fi)

.PHONY: deps demo test bench lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-$(EXTRA): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[$(EXTRA),dev]"
	touch $@

integrations/sandbox/node_modules/.installed: integrations/sandbox/package.json integrations/sandbox/package-lock.json
	npm ci --prefix integrations/sandbox --no-audit --no-fund --loglevel=error
	touch $@

deps: $(VENV)/.installed-$(EXTRA) integrations/sandbox/node_modules/.installed

demo: deps
	$(BIN)/cds demo

test: deps
	$(BIN)/cds rules check
	$(BIN)/pytest -q

bench: deps
	$(BIN)/python -m bench.run

lint: deps
	$(BIN)/ruff check cds integrations compliance tests

typecheck: deps
	$(BIN)/mypy cds integrations compliance

clean:
	rm -rf $(VENV) integrations/sandbox/node_modules var
