"""One batch through run_batch: a result jsonb cannot store fails its record alone."""

from __future__ import annotations

import datetime
from typing import Any

import psycopg

from flowfleet import queue
from flowfleet.batch import finish, run_batch
from flowfleet.entrypoint import describe


def returns_unstorable(payload: dict[str, Any]) -> Any:
    if payload["n"] == 1:
        return {"when": datetime.datetime(2026, 1, 1)}  # not JSON
    if payload["n"] == 2:
        return {"ratio": float("nan")}  # not JSON that PostgreSQL accepts
    return {"n": payload["n"]}


def test_unstorable_result_fails_only_its_record(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, "f", [{"n": n} for n in range(5)])
    batch = queue.claim(conn, "f", "me", 10, 60)
    policy = queue.RetryPolicy(max_retries=0)
    outcome = run_batch(conn, batch, describe(returns_unstorable), policy)
    assert outcome.failed == 2 and len(outcome.completed) == 3
    assert sorted(finish(conn, outcome)) == sorted(
        r.id for r in batch if r.payload["n"] > 2 or r.payload["n"] == 0
    )
    failed = conn.execute(
        "SELECT payload->>'n', error_message FROM processing_queue WHERE status = 'failed'"
        " ORDER BY 1"
    ).fetchall()
    assert [n for n, _ in failed] == ["1", "2"]
    assert all("result" in message and "JSON" in message for _, message in failed)
    stored = conn.execute("SELECT result FROM processing_history ORDER BY id").fetchall()
    assert stored == [({"n": 0},), ({"n": 3},), ({"n": 4},)]
