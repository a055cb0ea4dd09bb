# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv with Python 3.11 (torch 2.14.1 / torchvision 0.29.1 are pinned) and
# install Fashion-MNIST from Debian's dataset-fashion-mnist package when it is missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test data venv lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test,diffq,hf]'
	touch $(STAMP)

venv: $(STAMP)

$(FMNIST):
	@echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist

data: $(FMNIST)

demo: venv data
	$(VENV)/bin/vitcompress study quick --out runs/quick
	@echo "report: runs/quick/report.md (plots in runs/quick/plots/)"

test: venv data
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache
