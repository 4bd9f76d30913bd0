"""The demo's record processor: the seed's survey step (a little I/O-shaped wait) that
also writes one row per record in the transaction that completes it, so the demo can
count executions: a duplicate would be a second row."""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg

EFFECTS_TABLE = "demo_effects"


def survey_with_effect(payload: dict[str, Any], conn: psycopg.Connection) -> dict[str, Any]:
    time.sleep(float(os.environ.get("DEMO_WORK_SECONDS", "0.002")))
    conn.execute(f"INSERT INTO {EFFECTS_TABLE} (record_key) VALUES (%s)", (str(payload["n"]),))
    return {"survey_id": payload.get("survey_id"), "score": len(str(payload))}


def loop_effect(payload: dict[str, Any], conn: psycopg.Connection) -> None:
    """For the end-to-end loop tests: one row per execution, in the transaction that
    completes the record (so a fenced-off late completion leaves none), naming the pod.
    Takes ``payload["sleep"]`` seconds, else DEMO_WORK_SECONDS."""
    conn.execute(
        "INSERT INTO loop_effects (k, pod) VALUES (%s, %s)",
        (str(payload["k"]), os.environ.get("POD_NAME", "")),
    )
    time.sleep(float(payload.get("sleep", os.environ.get("DEMO_WORK_SECONDS", "0.01"))))
