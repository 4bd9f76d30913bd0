"""A processor that is a Prefect task: the Prefect runner gives each record a task run."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="check-record", cache_policy=NO_CACHE, persist_result=False)
def check_record(payload: dict[str, Any]) -> None:
    if payload.get("poison"):
        raise ValueError(f"poison record {payload.get('k')}")
