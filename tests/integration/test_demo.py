"""``make demo`` on a real database that already holds someone else's work."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor


def snapshot(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table in the public schema, as it is now."""
    tables = [
        row[0]
        for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
    ]
    return {
        table: conn.execute(f'SELECT * FROM "{table}" ORDER BY 1, 2').fetchall() for table in tables
    }


def run_demo(dsn: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLOWFLEET_DSN": dsn, "FLOWFLEET_DEMO_RECORDS": "300", "COLUMNS": "200"}
    env.pop("PREFECT_ENVIRONMENT", None)
    return subprocess.run(
        [sys.executable, "-m", "flowfleet.demo"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


@pytest.mark.slow
def test_demo_leaves_someone_elses_flow_and_tables_untouched(
    dsn: str, db: DatabaseManager, conn: psycopg.Connection
) -> None:
    # The README's own flow, in every state, and its results table: the demo must not
    # claim, fail, count, empty or delete any of it.
    users = DistributedProcessor(db, instance_id="their-pod", max_retries=0)
    users.add_records_to_queue("survey_processor", [{"survey_id": f"S{i}"} for i in range(6)])
    claimed = users.claim_records_batch("survey_processor", 3)
    users.mark_record_completed(claimed[0]["id"], {"score": 1})
    users.mark_record_failed(claimed[1]["id"], "theirs")
    conn.execute("CREATE TABLE survey_results (survey_id text, score int, processed_by text)")
    conn.execute("INSERT INTO survey_results VALUES ('S0', 1, 'their-pod'), ('S9', 2, NULL)")
    before = snapshot(conn)
    assert len(before["processing_queue"]) == 5 and len(before["survey_results"]) == 2

    first = run_demo(dsn)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "OK" in first.stdout and "MISMATCH" not in first.stdout
    assert "processed   300 of 300" in first.stdout
    assert snapshot(conn) == before

    # Rerunnable: the second run counts only its own records, not the first run's.
    second = run_demo(dsn)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "processed   300 of 300" in second.stdout
    assert "MISMATCH" not in second.stdout
    assert snapshot(conn) == before
