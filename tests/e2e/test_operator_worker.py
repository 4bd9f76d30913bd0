"""The worker's side of the operator's promise: a worker container restarted inside its
pod (same pod name, same instance id, e.g. after an OOM kill) returns the claims its
previous life held at once, instead of leaving them to their lease. Needs only
PostgreSQL, and a real `flowfleet worker` process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from flowfleet import queue
from flowfleet.migrate import migrate

from .operator_fixtures import PasswordPostgres

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

FLOW = "survey_processor"


def test_restarted_worker_returns_its_previous_claims_at_once(
    password_postgres: PasswordPostgres,
) -> None:
    dsn = password_postgres.dsn(password_postgres.new_database())
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        migrate(conn)
        queue.enqueue(conn, FLOW, [{"survey_id": f"S-{i}"} for i in range(5)])
        # The previous life of pod survey-abc12: claimed with a long lease, then killed.
        assert len(queue.claim(conn, FLOW, "survey-abc12", 5, 600)) == 5
    env = {**os.environ, "FLOWFLEET_DSN": dsn, "POD_NAME": "survey-abc12"}
    started = time.monotonic()
    worker = subprocess.run(
        [
            str(Path(sys.executable).with_name("flowfleet")),
            "worker",
            FLOW,
            "--entrypoint",
            "flowfleet.examples:survey_processor",
            "--runner",
            "plain",
            "--http-port",
            "0",
            "--exit-when-empty",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert worker.returncode == 0, worker.stderr
    # Far sooner than the 600 s lease: the claims came back when the worker started.
    assert time.monotonic() - started < 60
    assert "returned 5 records claimed before a restart" in worker.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT count(*), min(abandoned_count) FROM processing_history WHERE flow_name = %s",
            [FLOW],
        ).fetchone()
    assert rows == (5, 1)
