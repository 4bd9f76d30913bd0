"""One source of truth for defaults: the CRD's schema defaults, the worker's settings and
the Python API all agree with ``flowfleet.defaults``."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowfleet import defaults
from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor
from flowfleet.settings import WorkerSettings

CRD = Path(__file__).resolve().parents[2] / "crds" / "distributedflow.yaml"


def _spec_properties() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    props: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    return props


CRD_FIELDS = {
    "batchSize": defaults.BATCH_SIZE,
    "concurrency": defaults.CONCURRENCY,
    "leaseSeconds": defaults.LEASE_SECONDS,
    "maxRetries": defaults.MAX_RETRIES,
    "runner": defaults.RUNNER,
    "minReplicas": defaults.MIN_REPLICAS,
    "maxReplicas": defaults.MAX_REPLICAS,
    "recordsPerReplica": defaults.RECORDS_PER_REPLICA,
    "scaleDownDelaySeconds": defaults.SCALE_DOWN_DELAY_SECONDS,
    "pollIntervalSeconds": defaults.POLL_INTERVAL_SECONDS,
    "gracePeriodSeconds": defaults.GRACE_SECONDS,
    "environment": defaults.ENVIRONMENT,
}

WORKER_FIELDS = {
    "runner": defaults.RUNNER,
    "batch_size": defaults.BATCH_SIZE,
    "concurrency": defaults.CONCURRENCY,
    "lease_seconds": defaults.LEASE_SECONDS,
    "grace_seconds": defaults.GRACE_SECONDS,
    "poll_seconds": defaults.POLL_SECONDS,
    "http_port": defaults.HTTP_PORT,
    "flow_run_seconds": defaults.FLOW_RUN_SECONDS,
    "record_timeout_seconds": defaults.RECORD_TIMEOUT_SECONDS,
    "max_retries": defaults.MAX_RETRIES,
    "max_abandons": defaults.MAX_ABANDONS,
    "retry_backoff_seconds": defaults.RETRY_BACKOFF_SECONDS,
    "retry_backoff_max_seconds": defaults.RETRY_BACKOFF_MAX_SECONDS,
}


def test_crd_defaults_match_the_defaults_module() -> None:
    props = _spec_properties()
    found = {name: props[name].get("default") for name in CRD_FIELDS}
    assert found == CRD_FIELDS


def test_worker_settings_defaults_match_the_defaults_module() -> None:
    fields = WorkerSettings.model_fields
    found = {name: fields[name].get_default() for name in WORKER_FIELDS}
    assert found == WORKER_FIELDS


def test_operator_model_defaults_match_the_crd() -> None:
    """The operator reads a spec the API server defaulted; its own defaults (for specs read
    before defaulting, e.g. in tests) are the CRD's."""
    from flowfleet_operator.model import FlowSpec

    props = _spec_properties()
    fields = {f.alias: f.get_default() for f in FlowSpec.model_fields.values() if f.alias}
    for name, value in CRD_FIELDS.items():
        assert fields[name] == value == props[name]["default"], name
    assert props["database"]["properties"]["migrate"]["default"] is True
    assert FlowSpec.model_fields["database"].annotation is not None
    assert "default" not in props["replicas"]  # unset means autoscaling


def test_python_api_defaults_match_the_defaults_module(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("DEVELOPMENT_", "GLOBAL_", "PREFECT_ENVIRONMENT")):
            monkeypatch.delenv(name)
    # Building the processor does no I/O: the pool opens on first use.
    dp = DistributedProcessor(DatabaseManager("q", connection_string="postgresql://u@h/d"))
    assert dp.policy.max_retries == defaults.MAX_RETRIES
    assert dp.policy.backoff_base == defaults.RETRY_BACKOFF_SECONDS
    assert dp.policy.backoff_cap == defaults.RETRY_BACKOFF_MAX_SECONDS
    assert dp.max_abandons == defaults.MAX_ABANDONS
    assert dp.cleanup_timeout_hours == defaults.CLEANUP_TIMEOUT_HOURS
    # Claims through this API are not renewed, so they last the cleanup timeout.
    assert dp.lease_seconds == defaults.CLEANUP_TIMEOUT_HOURS * 3600
    batch_size = inspect.signature(dp.claim_records_batch).parameters["batch_size"]
    assert batch_size.default == defaults.BATCH_SIZE
