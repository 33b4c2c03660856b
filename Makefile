# mergekit_fast: `make demo` runs a merge on built-in demo models, `make test` runs the tests.
# Both set themselves up (scripts/bootstrap.sh) on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergekit_fast-installed
SRC_DEPS := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: setup demo test lint format bench bench-quick clean

setup: $(STAMP)

$(STAMP): $(SRC_DEPS)
	@echo "== set-up of $(VENV): virtualenv, torch 2.13.0 (CPU) unless a torch is there, the test"
	@echo "== dependencies, and the native module mergekit_fast._C compiled from csrc/ (C++, and CUDA"
	@echo "== when nvcc is found). The first run takes 2 to 4 minutes on 2 cores (more while pip"
	@echo "== downloads the dependencies for the first time); after a change to csrc/ or setup.py"
	@echo "== the native module is rebuilt: about 1.5 minutes with nvcc, 20 s without."
	VENV=$(VENV) scripts/bootstrap.sh
	touch $(STAMP)

demo: setup
	@echo "== demo (about 1 minute): the SLERP op on every backend here, then two random models (built"
	@echo "== once, cached in .demo/), a gradient SLERP merge and a depth up-scaling, loaded in transformers"
	$(PY) -m mergekit_fast.demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench-quick: setup
	$(PY) bench/run_all.py --quick

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf build *.egg-info mergekit_fast/_C*.so mergekit_fast/_build_info.json
