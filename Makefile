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
	VENV=$(VENV) scripts/bootstrap.sh
	touch $(STAMP)

demo: setup
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
