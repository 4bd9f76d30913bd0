"""The operator's settings: one pydantic object from ``FLOWFLEET_OPERATOR_*`` env,
validated at start-up; a bad value stops the process with one line naming the variable."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

PREFIX = "FLOWFLEET_OPERATOR_"


class SettingsError(ValueError):
    pass


class OperatorSettings(BaseModel):
    model_config = {"extra": "forbid", "frozen": True}

    # Empty: every namespace (cluster-wide).
    namespaces: tuple[str, ...] = ()
    prefect_api_url: str | None = Field(None, pattern=r"^https?://\S+$")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    http_port: int = Field(8080, ge=0, le=65535)  # 0: no HTTP server
    # The NOTIFY fast path; false leaves only the poll (the benchmark's KEDA-style anchor).
    listen: bool = True

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("prefect_api_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value


def load_settings(env: Mapping[str, str] | None = None) -> OperatorSettings:
    env = os.environ if env is None else env
    values = {
        name: env[PREFIX + name.upper()]
        for name in OperatorSettings.model_fields
        if PREFIX + name.upper() in env
    }
    try:
        return OperatorSettings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        variable = PREFIX + str(first["loc"][0]).upper() if first["loc"] else PREFIX
        raise SettingsError(f"{variable}: {first['msg']}") from None
