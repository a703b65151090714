# psych-cds: `make demo` runs everything on this machine, `make test` proves it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# onnxruntime-gpu where a GPU answers, the CPU build otherwise (never both in one venv).
EXTRA := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo gpu; else echo cpu; fi)

.PHONY: deps system demo test bench lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-$(EXTRA): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[$(EXTRA),dev]"
	touch $@

integrations/sandbox/node_modules/.installed: integrations/sandbox/package.json integrations/sandbox/package-lock.json
	npm ci --prefix integrations/sandbox --no-audit --no-fund --loglevel=error
	touch $@

# The OAuth 2 server (oidc-provider) the SMART Backend Services tests authenticate against.
integrations/sandbox/oauth/node_modules/.installed: integrations/sandbox/oauth/package.json integrations/sandbox/oauth/package-lock.json
	npm ci --prefix integrations/sandbox/oauth --no-audit --no-fund --loglevel=error
	touch $@

# Debian packages: Chromium for the browser tests (Playwright drives it; never `playwright install`)
# and a CJK font for the PDF risk report. Installed only when missing.
APT_NEEDS := $(if $(wildcard /usr/bin/chromium),,chromium) $(if $(wildcard /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc),,fonts-wqy-zenhei)
system:
	@if [ -n "$(strip $(APT_NEEDS))" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_NEEDS); \
	  elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_NEEDS); \
	  else echo "missing Debian packages: $(APT_NEEDS) (install them as root; browser tests are skipped until then)"; fi; \
	fi

deps: $(VENV)/.installed-$(EXTRA) integrations/sandbox/node_modules/.installed integrations/sandbox/oauth/node_modules/.installed system

demo: deps
	$(BIN)/cds demo

test: deps
	$(BIN)/mypy cds integrations compliance
	$(BIN)/cds rules check
	$(BIN)/pytest -q

bench: deps
	$(BIN)/python -m bench.run $(ARGS)

lint: deps
	$(BIN)/ruff check cds integrations compliance tests

typecheck: deps
	$(BIN)/mypy cds integrations compliance

clean:
	rm -rf $(VENV) integrations/sandbox/node_modules integrations/sandbox/oauth/node_modules var

