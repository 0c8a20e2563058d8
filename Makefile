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

# ---- delivery: chart, raw manifests, images, kind demo (see docs/delivery.md) ----
.PHONY: images demo demo-down
TAG ?= dev
OPERATOR_IMAGE ?= ghcr.io/gptd-io/gptd-operator:$(TAG)
RUNTIME_IMAGE ?= ghcr.io/gptd-io/gptd-runtime:$(TAG)
DOCKER ?= docker

generate: $(STAMP)  ## regenerate the chart CRD, manifests/install.yaml and the Argo CD patch
	$(VPY) hack/generate.py

images:  ## build the operator and runtime images (needs Docker)
	$(DOCKER) build -f operator/Dockerfile -t $(OPERATOR_IMAGE) .
	$(DOCKER) build -f runtime/Dockerfile -t $(RUNTIME_IMAGE) .

demo:  ## kind cluster + images + helm install + demo model + GPTDeployment + completion, scale, rollout
	OPERATOR_IMAGE=$(OPERATOR_IMAGE) RUNTIME_IMAGE=$(RUNTIME_IMAGE) hack/demo.sh all

demo-down:  ## delete the kind demo cluster
	hack/demo.sh down
