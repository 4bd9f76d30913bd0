# flowfleet: the two commands are `make demo` and `make test`; both set themselves up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST := $(BIN)/pytest

.PHONY: setup demo test test-unit test-integration test-e2e bench lint fmt cluster-up cluster-down node-up node-down demo-k8s helm clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,operator]'
	@touch $@

demo: setup
	$(BIN)/python -m flowfleet.demo

# The loop on one machine: control plane, local node, PostgreSQL, a burst (hack/demo_k8s.py;
# DEMO_K8S_ARGS="--operator-cmd ... --flow-manifest ..." puts the operator in charge).
demo-k8s: setup
	$(BIN)/python hack/demo_k8s.py $(DEMO_K8S_ARGS)

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
	$(BIN)/python bench/bench_scale.py --quick
	$(BIN)/python bench/bench_operator.py

lint: setup
	$(BIN)/ruff check worker operator tests bench hack
	$(BIN)/ruff format --check worker operator tests bench hack
	$(BIN)/mypy
	$(BIN)/mypy hack/localnode/localnode hack/demo_k8s.py hack/demo_processors.py

fmt: setup
	$(BIN)/ruff check --fix worker operator tests bench hack
	$(BIN)/ruff format worker operator tests bench hack

cluster-up:
	@hack/controlplane/cluster.sh up

cluster-down:
	@hack/localnode/node.sh stop
	@hack/controlplane/cluster.sh down

# A local node that runs the cluster's pods as flowfleet processes (hack/localnode).
node-up: setup cluster-up
	@hack/localnode/node.sh start

node-down:
	@hack/localnode/node.sh stop

# The pinned helm, built from its Go module into ~/.cache/flowfleet/helm/ (once).
helm:
	@hack/helm/helm.sh build

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo .localnode
