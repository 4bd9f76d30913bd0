"""Hierarchical settings: the seed's ``core.config``.

``ConfigManager("survey_processor").get_variable("distributed_batch_size", 50)`` looks up,
most specific first, ``{environment}.{flow}.{key}`` -> ``{environment}.global.{key}`` ->
``global.{key}``, read from the environment variables
``DEVELOPMENT_SURVEY_PROCESSOR_DISTRIBUTED_BATCH_SIZE``,
``DEVELOPMENT_GLOBAL_DISTRIBUTED_BATCH_SIZE`` and ``GLOBAL_DISTRIBUTED_BATCH_SIZE``.
Values come back typed like the default.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, TypeVar

from flowfleet.errors import ConfigError

__all__ = ["ConfigError", "ConfigManager", "coerce", "env_name", "environment"]

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def environment() -> str:
    """The environment settings are read for: ``PREFECT_ENVIRONMENT``, else development."""
    return os.environ.get("PREFECT_ENVIRONMENT", "development").strip() or "development"


def env_name(*parts: str) -> str:
    """``env_name("development", "rpa_db", "type")`` -> ``DEVELOPMENT_RPA_DB_TYPE``."""
    return "_".join(re.sub(r"[^A-Za-z0-9]+", "_", p).strip("_").upper() for p in parts)


def coerce(raw: str, default: Any, source: str) -> Any:
    """Parse ``raw`` into the type of ``default``; the error names the variable."""
    try:
        if isinstance(default, bool):
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError(f"expected true or false, got {raw!r}")
        if isinstance(default, int):
            return int(raw.strip())
        if isinstance(default, float):
            return float(raw.strip())
        if isinstance(default, list | dict):
            value = json.loads(raw)
            if not isinstance(value, type(default)):
                raise ValueError(f"expected a JSON {type(default).__name__}")
            return value
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return raw


class ConfigManager:
    def __init__(self, flow_name: str = "global", environment_name: str | None = None) -> None:
        self.flow_name = flow_name
        self.environment = environment_name or environment()

    def candidates(self, key: str) -> list[str]:
        """The environment variable names tried for ``key``, most specific first."""
        return [
            env_name(self.environment, self.flow_name, key),
            env_name(self.environment, "global", key),
            env_name("global", key),
        ]

    def source(self, key: str) -> str | None:
        """The environment variable that supplies ``key``, or None when none is set."""
        return next((name for name in self.candidates(key) if name in os.environ), None)

    def get_variable(self, key: str, default: T = None) -> T:  # type: ignore[assignment]
        name = self.source(key)
        if name is None:
            return default
        raw = os.environ[name]
        return coerce(raw, default, name) if default is not None else raw  # type: ignore[return-value]
