# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv with Python 3.11, install the project with the versions in constraints.txt (torch
# 2.14.1 / torchvision 0.29.1 come from this machine's disk), and install Fashion-MNIST from Debian's
# dataset-fashion-mnist package when it is missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.installed-demo
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# What `make demo` installs: the library and the runtimes the demo measures on (PyTorch, ONNX Runtime,
# OpenVINO). `make test` adds search, the Hugging Face path, experiment tracking and the test tools
# (0.8 GB more). Neither installs diffq (CC BY-NC 4.0, non-commercial: pip install -e '.[diffq]') or
# ray (pip install -e '.[ray]').
DEMO_EXTRAS ?= openvino
EXTRAS ?= test,openvino,search,hf,tracking
# PyTorch's CPU-only wheels: on a machine without an NVIDIA GPU, torch and torchvision come from here
# when it answers (a few hundred MB instead of several GB of CUDA libraries); else from the usual index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test data venv lint bench clean

$(DEMO_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1 && curl -fsI --max-time 5 $(TORCH_CPU_INDEX)/torch/ >/dev/null 2>&1; then \
		echo "no NVIDIA GPU: installing the CPU build of torch from $(TORCH_CPU_INDEX)"; \
		$(PY) -m pip install --disable-pip-version-check -q --index-url $(TORCH_CPU_INDEX) \
			"torch==$$(sed -n 's/^torch==//p' constraints.txt)+cpu" \
			"torchvision==$$(sed -n 's/^torchvision==//p' constraints.txt)+cpu" \
			|| echo "the CPU build could not be installed; the default build is used"; \
	fi
	$(PIP) -e '.[$(DEMO_EXTRAS)]'
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PIP) -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP)

$(FMNIST):
	@echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist

data: $(FMNIST)

demo: $(DEMO_STAMP) data
	$(VENV)/bin/vitcompress study quick --out runs/quick

test: venv data
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache
