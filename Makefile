# gptd — common tasks. `make test` is the one command CI runs (see .ci/run).
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv test test-fast lint generate

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install gptd with all extras

test: $(STAMP)  ## install everything and run the whole test suite
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q -ra

lint: $(STAMP)  ## ruff
	$(VPY) -m ruff check .
