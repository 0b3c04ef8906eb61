# Two commands on a fresh clone:  `make train` (the main job)  and  `make test` (the test suite).
# TORCH=cpu (default) installs torch's CPU wheel where one is offered locally, TORCH=cuda a CUDA build.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
# On GPU hosts PyPI's Linux wheel of this version is the CUDA build; CUDA_INDEX picks another CUDA flavour.
CUDA_INDEX ?=
EXPERIMENT ?= sae_4096
ARGS ?=
# TransformerLens, SAELens, SAEDashboard and SAEBench pin numpy < 2 and an older datasets: their own venv
INTEROP_VENV ?= .venv-interop

.PHONY: help install install-dev corpus train train-transformer cache test test-fast lint clean bench interop-env test-interop

help:
	@echo "make train   install into $(VENV), fetch the corpus, run experiment=$(EXPERIMENT)"
	@echo "make test    install the dev extra and run the test suite"
	@echo "make bench   one table of SAE training speed and memory on this machine (after make train)"
	@echo "make lint    ruff + hadolint"
	@echo "make test-interop  TransformerLens / SAELens / SAEDashboard / SAEBench tests, in $(INTEROP_VENV)"

$(VENV)/.torch-$(TORCH):
	$(PYTHON) -m venv $(VENV)
ifeq ($(TORCH),cuda)
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(CUDA_INDEX),--index-url $(CUDA_INDEX))
else
	$(PIP) install -q torch==$(TORCH_VERSION)
endif
	touch $@

$(VENV)/.installed: $(VENV)/.torch-$(TORCH) pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The default corpus: the Linux kernel documentation from Debian's linux-doc package (GPL-2.0).
corpus:
	@if ls -d /usr/share/doc/linux-doc-*/Documentation >/dev/null 2>&1; then \
		echo "corpus: $$(ls -d /usr/share/doc/linux-doc-*/Documentation | tail -1)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-doc; \
	else \
		echo "The default corpus needs Debian's linux-doc package: run 'sudo apt-get install linux-doc'," >&2; \
		echo "or train the transformer on other text: .venv/bin/python src/train.py experiment=transformer_1l data=local_files data.corpus.data_files='path/*.txt'" >&2; \
		exit 1; \
	fi

train: install corpus
	$(PY) src/train.py experiment=$(EXPERIMENT) $(ARGS)

train-transformer: install corpus
	$(PY) src/train.py experiment=transformer_1l $(ARGS)

cache: install corpus
	$(PY) src/cache_activations.py $(ARGS)

test: install-dev
	$(VENV)/bin/pytest -q $(ARGS)

# One table of SAE training speed and memory on this machine (needs `make train`'s demo cache and SAE;
# ~65 min on 2 CPU cores); writes bench/results/<date>.md. ARGS=--quick: tiny sizes, a few minutes.
bench: install
	$(PY) bench/bench_table.py $(ARGS)

# The field's tools in their own environment (~3 min to build, ~3 GB): pinned by interop-constraints.txt.
# SAEBench requires torchvision, but PyPI's build does not import beside the pinned CPU torch and nothing
# we call uses it, so it is removed again.
$(INTEROP_VENV)/.installed: pyproject.toml interop-constraints.txt
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install -q torch==$(TORCH_VERSION)
	$(INTEROP_VENV)/bin/pip install -q -c interop-constraints.txt -e . pytest sae-lens transformer-lens sae-dashboard sae-bench
	$(INTEROP_VENV)/bin/pip uninstall -y -q torchvision torchaudio
	touch $@

interop-env: $(INTEROP_VENV)/.installed

test-interop: interop-env
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(INTEROP_VENV)/bin/pytest -q tests/interop $(ARGS)

test-fast: install-dev
	$(VENV)/bin/pytest -q -m "not slow" $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint --config .hadolint.yaml Dockerfile

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
