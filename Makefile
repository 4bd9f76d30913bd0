# flowfleet: the two commands are `make demo` and `make test`; both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST := $(BIN)/pytest

.PHONY: setup demo test test-unit test-integration test-e2e bench lint fmt cluster-up cluster-down helm clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,operator]'
	@touch $@

demo: setup
	$(BIN)/python -m flowfleet.demo

test: setup lint
	$(PYTEST) tests/unit tests/integration tests/e2e

test-unit: setup
	$(PYTEST) tests/unit

test-integration: setup
	$(PYTEST) tests/integration

test-e2e: setup
	$(PYTEST) tests/e2e

bench: setup
	$(BIN)/python bench/bench_queue.py
	$(BIN)/python bench/bench_worker.py

lint: setup
	$(BIN)/ruff check worker operator tests bench
	$(BIN)/ruff format --check worker operator tests bench
	$(BIN)/mypy

fmt: setup
	$(BIN)/ruff check --fix worker operator tests bench
	$(BIN)/ruff format worker operator tests bench

cluster-up:
	@hack/controlplane/cluster.sh up

cluster-down:
	@hack/controlplane/cluster.sh down

# The pinned helm, built from its Go module into ~/.cache/flowfleet/helm/ (once).
helm:
	@hack/helm/helm.sh build

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo
