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
	$(VENV)/bin/lint-imports
	$(VPY) -m pytest -q -ra

lint: $(STAMP)  ## ruff
	$(VPY) -m ruff check .

# ---- delivery: chart, raw manifests, images, kind demo (see docs/delivery.md) ----
.PHONY: images images-cpu demo demo-down
# Images: $(REGISTRY)/gptd-operator:$(TAG), $(REGISTRY)/gptd-runtime:$(TAG) (CUDA torch) and
# $(REGISTRY)/gptd-runtime:$(TAG)-cpu (CPU torch: kind, the demo, manifests/samples/cpu.yaml).
REGISTRY ?= ghcr.io/gptd-io
TAG ?= dev
OPERATOR_IMAGE ?= $(REGISTRY)/gptd-operator:$(TAG)
RUNTIME_IMAGE ?= $(REGISTRY)/gptd-runtime:$(TAG)
RUNTIME_CPU_IMAGE ?= $(REGISTRY)/gptd-runtime:$(TAG)-cpu
CPU_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
DOCKER ?= docker
# Local builds skip the provenance attestation: with Docker's containerd image store it makes an OCI index that
# `kind load docker-image` cannot import. Release builds (.github/workflows/release.yaml) attach SBOM + provenance.
DOCKER_BUILD_FLAGS ?= --provenance=false

generate: $(STAMP)  ## regenerate the chart CRD, manifests/install.yaml, the Argo CD patch, hack/requirements/
	$(VPY) hack/generate.py

images: images-cpu  ## build the operator and both runtime images (CUDA and -cpu; needs Docker)
	$(DOCKER) build $(DOCKER_BUILD_FLAGS) -f runtime/Dockerfile -t $(RUNTIME_IMAGE) .

images-cpu:  ## build the operator and the CPU runtime image (what kind needs)
	$(DOCKER) build $(DOCKER_BUILD_FLAGS) -f operator/Dockerfile -t $(OPERATOR_IMAGE) .
	$(DOCKER) build $(DOCKER_BUILD_FLAGS) -f runtime/Dockerfile --build-arg TORCH_INDEX_URL=$(CPU_TORCH_INDEX) \
		-t $(RUNTIME_CPU_IMAGE) .

demo:  ## kind cluster + images + helm install + demo model + GPTDeployment + completion, scale, rollout
	OPERATOR_IMAGE=$(OPERATOR_IMAGE) RUNTIME_IMAGE=$(RUNTIME_CPU_IMAGE) TORCH_INDEX_URL=$(CPU_TORCH_INDEX) \
		hack/demo.sh all

demo-down:  ## delete the kind demo cluster (downloads nothing)
	hack/demo.sh down
