"""The worker's settings: command-line options first, then ConfigManager env names.

Each setting of flow ``survey_processor`` in environment ``development`` is read, when no
option gives it, from ``DEVELOPMENT_SURVEY_PROCESSOR_<KEY>``, then
``DEVELOPMENT_GLOBAL_<KEY>``, then ``GLOBAL_<KEY>``; keys are listed in ``ENV_KEYS``.

Two process-wide settings of the queue database are read by ``flowfleet.database`` and
checked here at start: FLOWFLEET_PGBOUNCER (1, 0 or auto) and FLOWFLEET_LISTEN_DSN.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from flowfleet import defaults
from flowfleet.config import ConfigManager
from flowfleet.connstrings import check_dsn
from flowfleet.errors import FlowfleetError
from flowfleet.pooler import LISTEN_DSN_ENV, pooler_setting

ENV_KEYS = {
    "entrypoint": "entrypoint",
    "runner": "worker_runner",
    "batch_size": "distributed_batch_size",
    "concurrency": "worker_concurrency",
    "lease_seconds": "worker_lease_seconds",
    "grace_seconds": "worker_grace_seconds",
    "poll_seconds": "worker_poll_seconds",
    "http_port": "worker_http_port",
    "flow_run_seconds": "worker_flow_run_seconds",
    "record_timeout_seconds": "worker_record_timeout_seconds",
    "max_retries": "max_retries",
    "max_abandons": "max_abandons",
    "retry_backoff_seconds": "retry_backoff_seconds",
    "retry_backoff_max_seconds": "retry_backoff_max_seconds",
    "max_batch_bytes": "worker_max_batch_bytes",
    "log_level": "worker_log_level",
}


# Upper bounds refuse absurd values (1e300 s) with the setting's name, before a timer
# or an interval in SQL chokes on them later.
DAY = 24 * 3600


class WorkerSettings(BaseModel):
    model_config = {"extra": "forbid"}

    flow_name: str = Field(min_length=1, max_length=100)
    entrypoint: str = Field(min_length=3)
    runner: Literal["prefect", "plain"] = defaults.RUNNER
    batch_size: int = Field(defaults.BATCH_SIZE, ge=1, le=10_000)
    concurrency: int = Field(defaults.CONCURRENCY, ge=1, le=256)
    lease_seconds: float = Field(float(defaults.LEASE_SECONDS), gt=0, le=DAY, allow_inf_nan=False)
    # Kubernetes kills a pod 30 s after SIGTERM by default; finish before that.
    grace_seconds: float = Field(float(defaults.GRACE_SECONDS), ge=0, le=DAY, allow_inf_nan=False)
    poll_seconds: float = Field(float(defaults.POLL_SECONDS), gt=0, le=DAY, allow_inf_nan=False)
    http_port: int = Field(defaults.HTTP_PORT, ge=0, le=65535)
    flow_run_seconds: float = Field(
        float(defaults.FLOW_RUN_SECONDS), gt=0, le=DAY, allow_inf_nan=False
    )
    # 0: no limit. Past it a record counts as hung: its lease is no longer renewed and
    # /healthz fails, so the pod is restarted and the record treated as abandoned.
    record_timeout_seconds: float = Field(
        float(defaults.RECORD_TIMEOUT_SECONDS), ge=0, le=7 * DAY, allow_inf_nan=False
    )
    max_retries: int = Field(defaults.MAX_RETRIES, ge=0, le=1_000_000)
    max_abandons: int = Field(defaults.MAX_ABANDONS, ge=1, le=1_000_000)
    retry_backoff_seconds: float = Field(
        defaults.RETRY_BACKOFF_SECONDS, ge=0, le=7 * DAY, allow_inf_nan=False
    )
    retry_backoff_max_seconds: float = Field(
        defaults.RETRY_BACKOFF_MAX_SECONDS, ge=0, le=7 * DAY, allow_inf_nan=False
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    exit_when_empty: bool = False
    # A worker holds a claimed batch in memory: about batch_size times the payload size
    # (several times the JSON text, once parsed). This bounds a batch by the payloads'
    # JSON bytes instead; None: batch_size alone bounds it.
    max_batch_bytes: int | None = Field(None, ge=1)

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def heartbeat_seconds(self) -> float:
        # Three renewals per lease: one lost round trip never lets a live claim expire.
        return self.lease_seconds / 3


def load_settings(flow_name: str, options: dict[str, Any]) -> WorkerSettings:
    """Merge options (None = not given) with the environment and validate; a bad value
    raises a FlowfleetError naming the setting."""
    flow_config = ConfigManager(flow_name)
    shared = ConfigManager("distributed_processor")
    defaults = WorkerSettings.model_fields
    values: dict[str, Any] = {"flow_name": flow_name}
    origin: dict[str, str] = {}  # where each value came from, for error messages
    for field, key in ENV_KEYS.items():
        given = options.get(field)
        if given is not None:
            values[field] = given
            origin[field] = f"option --{field.replace('_', '-')}"
            continue
        source = flow_config.source(key) or shared.source(key)
        if source is not None:
            origin[field] = source
        info = defaults[field]
        # Typed like the default, so "50" arrives as 50; a required one is a string.
        default = "" if info.is_required() else info.get_default()
        found = flow_config.get_variable(key, shared.get_variable(key, default))
        if found != "":
            values[field] = found
    values["exit_when_empty"] = bool(options.get("exit_when_empty"))
    check_pooler_settings()
    try:
        return WorkerSettings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        if where in origin:
            hint = f" (from {origin[where]})"
        elif where in ENV_KEYS:
            hint = (
                f" (give --{where.replace('_', '-')} or set "
                f"{flow_config.candidates(ENV_KEYS[where])[0]})"
            )
        else:
            hint = ""
        raise FlowfleetError(f"invalid worker setting {where}: {first['msg']}{hint}") from None


def check_pooler_settings() -> None:
    """Refuse a bad FLOWFLEET_PGBOUNCER or FLOWFLEET_LISTEN_DSN now, in one line, rather
    than in the listener thread later."""
    pooler_setting()
    listen_dsn = os.environ.get(LISTEN_DSN_ENV, "").strip()
    if listen_dsn:
        check_dsn(f"listen ({LISTEN_DSN_ENV})", listen_dsn)
