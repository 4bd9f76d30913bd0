"""The typed DistributedFlow: the only code that knows the CRD's field names.

Pure: parsing and defaults, no I/O. Defaults come from ``flowfleet.defaults``, as the
CRD's do (``tests/unit/test_defaults.py`` proves they agree), so a spec read before the
API server defaulted it means the same thing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from flowfleet import defaults

GROUP = "flowfleet.io"
VERSION = "v1alpha1"
PLURAL = "distributedflows"
KIND = "DistributedFlow"
API_VERSION = f"{GROUP}/{VERSION}"


class _Camel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore"
    )


class SecretKeyRef(_Camel):
    name: str = Field(min_length=1)
    key: str = "connection-string"


class ApiKeyRef(_Camel):
    name: str = Field(min_length=1)
    key: str = "api-key"


class Database(_Camel):
    secret_ref: SecretKeyRef
    migrate: bool = True


class Prefect(_Camel):
    api_url: str | None = None
    api_key_secret_ref: ApiKeyRef | None = None


class SourceDatabase(_Camel):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
    secret_ref: SecretKeyRef


class FlowSpec(_Camel):
    flow_name: str
    image: str
    entrypoint: str
    database: Database
    runner: Literal["prefect", "plain"] = defaults.RUNNER
    batch_size: int = Field(defaults.BATCH_SIZE, ge=1)
    concurrency: int = Field(defaults.CONCURRENCY, ge=1)
    min_replicas: int = Field(defaults.MIN_REPLICAS, ge=0)
    max_replicas: int = Field(defaults.MAX_REPLICAS, ge=1)
    replicas: int | None = Field(None, ge=0)
    records_per_replica: int = Field(defaults.RECORDS_PER_REPLICA, ge=1)
    target_drain_seconds: int | None = Field(None, ge=1)
    scale_down_delay_seconds: int = Field(defaults.SCALE_DOWN_DELAY_SECONDS, ge=0)
    poll_interval_seconds: int = Field(defaults.POLL_INTERVAL_SECONDS, ge=1)
    lease_seconds: int = Field(defaults.LEASE_SECONDS, ge=1)
    max_retries: int = Field(defaults.MAX_RETRIES, ge=0)
    grace_period_seconds: int = Field(defaults.GRACE_SECONDS, ge=1)
    environment: str = defaults.ENVIRONMENT
    prefect: Prefect = Prefect()
    source_databases: tuple[SourceDatabase, ...] = ()
    env: tuple[dict[str, Any], ...] = ()
    resources: dict[str, Any] | None = None
    node_selector: dict[str, str] | None = None
    tolerations: tuple[dict[str, Any], ...] | None = None
    affinity: dict[str, Any] | None = None
    image_pull_secrets: tuple[dict[str, Any], ...] | None = None
    image_pull_policy: str | None = None
    service_account_name: str | None = None
    priority_class_name: str | None = None
    pod_labels: dict[str, str] | None = None
    pod_annotations: dict[str, str] | None = None


class InvalidSpec(ValueError):
    """A spec the CRD schema let through but the operator cannot use; one line."""


def parse_spec(spec: Any) -> FlowSpec:
    try:
        parsed = FlowSpec.model_validate(dict(spec))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidSpec(f"spec.{where}: {first['msg']}") from None
    if parsed.min_replicas > parsed.max_replicas:
        raise InvalidSpec("spec.minReplicas must not exceed spec.maxReplicas")
    return parsed


def prefect_api_url(spec: FlowSpec, default: str | None) -> str | None:
    """The Prefect API the workers report to, or None when the flow needs none."""
    if spec.runner != "prefect":
        return spec.prefect.api_url
    return spec.prefect.api_url or default or None
