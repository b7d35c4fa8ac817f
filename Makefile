# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DATA ?= ../shared/data/glue/MRPC
OUT ?= runs/mrpc

VENV_MIN ?= .venv-min

.PHONY: install train test test-min bench bench-quick

install:
	$(PIP) install -q -e ".[dev]" -c constraints.txt

train: install
	$(PYTHON) -m tuneloop train --task mrpc --data-dir $(DATA) --output-dir $(OUT) --overwrite

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q

# The suite with the lowest torch, transformers, accelerate and datasets pyproject.toml allows, in a fresh
# virtual environment (git-ignored): proves the lower bounds. torch from PyPI is a CUDA build (~3 GB with its
# nvidia wheels); it runs on CPUs.
test-min: $(VENV_MIN)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH= $(VENV_MIN)/bin/python -m pytest -q

# Rebuilt from nothing whenever the lowest versions or the dependencies change.
$(VENV_MIN)/.installed: constraints-min.txt pyproject.toml
	rm -rf $(VENV_MIN)
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/pip install -q -e ".[test]" -c constraints-min.txt
	$(VENV_MIN)/bin/python -c "import torch, transformers, accelerate, datasets as d; print('test-min:', torch.__version__, transformers.__version__, accelerate.__version__, d.__version__)"
	touch $@

bench: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) benchmarks/bench.py

bench-quick: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) benchmarks/bench.py --quick
