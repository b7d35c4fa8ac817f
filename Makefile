# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DATA ?= ../shared/data/glue/MRPC
OUT ?= runs/mrpc

.PHONY: install train test bench bench-quick

install:
	$(PIP) install -q -e ".[dev]"

train: install
	$(PYTHON) -m tuneloop train --task mrpc --data-dir $(DATA) --output-dir $(OUT) --overwrite

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) benchmarks/bench.py

bench-quick: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) benchmarks/bench.py --quick
