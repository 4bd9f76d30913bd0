"""Record processors for the demo, the benchmarks and the quick start."""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg


def noop(payload: dict[str, Any]) -> None:
    """Does nothing: measures the queue, not the work."""


def survey_processor(payload: dict[str, Any]) -> dict[str, Any]:
    """A stand-in for an RPA step: a little I/O-shaped wait, a result to keep."""
    time.sleep(float(os.environ.get("FLOWFLEET_EXAMPLE_WORK_SECONDS", "0.001")))
    return {"survey_id": payload.get("survey_id"), "score": len(str(payload))}


def flaky(payload: dict[str, Any]) -> None:
    """Raises for payloads marked poison: they fail alone, after their retries."""
    if payload.get("poison"):
        raise ValueError(f"poison record {payload.get('n')}")


def record_effect(payload: dict[str, Any], conn: psycopg.Connection) -> None:
    """Writes its effect in the transaction that completes the record: exactly once."""
    conn.execute("INSERT INTO example_effects (record_key) VALUES (%s)", (str(payload.get("n")),))
