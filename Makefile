# make demo: set up .venv and run the embedded demo; make test: set up .venv and run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take the CPU build of torch; on a CUDA machine: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,plots,docs
# threads of each process of `make demo` (OMP_NUM_THREADS): the machine's cores by default; on a
# busy shared machine fewer run faster (make demo THREADS=1)
THREADS ?= $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 1)

.PHONY: setup demo demo-record test test-all lint docs

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	OMP_NUM_THREADS=$(THREADS) $(BIN)/breakhis-ft experiment=demo
	-$(BIN)/breakhis-ft-demo-metrics  # this run's figures beside the README's

# after `make demo` on the reference machine: benchmarks/results/demo_metrics.json and the
# README's figure
demo-record: setup
	$(BIN)/breakhis-ft-demo-metrics --record

# two pytest workers, one file each at a time (module fixtures are built once), one thread per
# process: the tests are mostly single-threaded, so two workers halve the wall time on 2 cores
PYTEST = OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: setup
	$(PYTEST)

test-all: setup
	$(PYTEST) -m "slow or not slow"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# the manual (docs/, mkdocs.yml) into site/; --strict: a broken link or a missing page fails
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # (the theme's notice about MkDocs 2)
