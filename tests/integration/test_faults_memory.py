"""A bound on a worker's memory: a batch's payloads, not only its record count.

A worker holds a claimed batch in memory, so without a bound its memory is batch size
times payload size, whatever the payloads hold. ``max_batch_bytes`` (setting
``worker_max_batch_bytes``) ends a batch before its payloads, as JSON text, add up to
more; the first record is always taken, so a record larger than the bound still runs.
"""

from __future__ import annotations

import psycopg
import pytest

from flowfleet import queue
from flowfleet.settings import load_settings

FLOW = "memory_flow"


def payload_bytes(conn: psycopg.Connection, ids: list[int]) -> int:
    row = conn.execute(
        "SELECT coalesce(sum(octet_length(payload::text)), 0) FROM processing_queue"
        " WHERE id = ANY(%s)",
        (ids,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_claims_stop_before_the_byte_budget(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, FLOW, [{"k": k, "blob": "x" * 990} for k in range(10)])
    size = payload_bytes(conn, [r[0] for r in conn.execute("SELECT id FROM processing_queue")])
    one = size // 10

    first = queue.claim(conn, FLOW, "me", 10, 60, max_batch_bytes=3 * one + one // 2)
    assert [r.payload["k"] for r in first] == [0, 1, 2]
    assert payload_bytes(conn, [r.id for r in first]) <= 3 * one + one // 2
    # The rest stay pending and come in order; the next batch is bounded the same way.
    following = queue.complete_and_claim(conn, first, FLOW, "me", 10, 60, max_batch_bytes=2 * one)
    assert [r.payload["k"] for r in following] == [3, 4]
    # A record larger than the whole budget is still claimed, alone.
    alone = queue.claim(conn, FLOW, "me", 10, 60, max_batch_bytes=10)
    assert [r.payload["k"] for r in alone] == [5]
    # No budget: batch_size alone.
    rest = queue.claim(conn, FLOW, "me", 10, 60)
    assert [r.payload["k"] for r in rest] == [6, 7, 8, 9]


def test_the_bound_is_a_worker_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_ENVIRONMENT", raising=False)
    monkeypatch.setenv("DEVELOPMENT_GLOBAL_WORKER_MAX_BATCH_BYTES", "1000000")
    settings = load_settings(FLOW, {"entrypoint": "m:f"})
    assert settings.max_batch_bytes == 1_000_000
    monkeypatch.delenv("DEVELOPMENT_GLOBAL_WORKER_MAX_BATCH_BYTES")
    assert load_settings(FLOW, {"entrypoint": "m:f"}).max_batch_bytes is None
