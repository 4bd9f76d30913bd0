"""Retries: exponential backoff with jitter, then 'failed' with the error kept."""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout
from datetime import timedelta

import psycopg
import pytest

from flowfleet import queue
from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor

FLOW = "retry_flow"

# Verbatim from the seed's "High Error Rates" troubleshooting section.
HIGH_ERROR_RATES_SQL = """
    SELECT error_message, COUNT(*) as count
    FROM processing_queue
    WHERE status = 'failed'
    AND updated_at > NOW() - INTERVAL '24 hours'
    GROUP BY error_message
    ORDER BY count DESC
    LIMIT 5
"""


def delay_of(conn: psycopg.Connection, record_id: int) -> timedelta:
    # available_at and updated_at are both stamped with the failing statement's time.
    found = conn.execute(
        "SELECT available_at - updated_at FROM processing_queue WHERE id = %s", (record_id,)
    ).fetchone()
    assert found is not None
    return found[0]


def test_backoff_then_failed_while_the_flow_keeps_moving(conn: psycopg.Connection) -> None:
    policy = queue.RetryPolicy(max_retries=3, backoff_base=0.05, backoff_cap=1)
    # The doomed record outranks the others, so a claim of one takes it whenever it is due.
    queue.enqueue(conn, FLOW, [{"doomed": True}], priority=1)
    queue.enqueue(conn, FLOW, [{"n": i} for i in range(10)])
    completed_others = 0

    for attempt in range(policy.max_retries + 1):
        (doomed,) = queue.claim(conn, FLOW, "pod", 1, 60)
        assert doomed.payload == {"doomed": True}
        assert doomed.retry_count == attempt
        status = queue.fail(
            conn,
            doomed.id,
            doomed.claim_token,
            "upstream timeout",
            error_details=f"Traceback attempt {attempt}",
            policy=policy,
        )
        state = conn.execute(
            "SELECT status, retry_count, error_message, error_details, flow_instance_id,"
            " claim_token FROM processing_queue WHERE id = %s",
            (doomed.id,),
        ).fetchone()
        if attempt < policy.max_retries:
            assert status == "pending"
            assert state == (
                "pending",
                attempt + 1,
                "upstream timeout",
                f"Traceback attempt {attempt}",
                None,
                None,
            )
            full = min(policy.backoff_cap, policy.backoff_base * 2**attempt)
            seconds = delay_of(conn, doomed.id).total_seconds()
            assert 0.5 * full - 1e-6 <= seconds <= full + 1e-6, (attempt, seconds)
            # While it waits out its backoff, the rest of the flow is claimed and completed.
            (other,) = queue.claim(conn, FLOW, "pod", 1, 60)
            assert other.id != doomed.id
            assert queue.complete(conn, [other]) == [other.id]
            completed_others += 1
            time.sleep(full + 0.02)
        else:
            assert status == "failed"
            assert state == (
                "failed",
                policy.max_retries,
                "upstream timeout",
                f"Traceback attempt {attempt}",
                "pod",
                None,
            )

    rest = queue.claim(conn, FLOW, "pod", 100, 60)
    assert doomed.id not in {r.id for r in rest}
    assert len(rest) == 10 - completed_others
    queue.complete(conn, rest)
    assert queue.claim(conn, FLOW, "pod", 100, 60) == []
    counts = queue.stats(conn, FLOW)[FLOW]
    assert counts["failed_records"] == 1
    assert counts["completed_records"] == 10
    assert counts["pending_records"] == counts["processing_records"] == 0


def test_backoff_is_capped_and_jittered(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, FLOW, [{"n": i} for i in range(20)])
    batch = queue.claim(conn, FLOW, "pod", 20, 60)
    big = queue.RetryPolicy(max_retries=5, backoff_base=10, backoff_cap=1000)
    for record in batch:
        assert queue.fail(conn, record.id, record.claim_token, "x", policy=big) == "pending"
    delays = [delay_of(conn, r.id).total_seconds() for r in batch]
    assert all(5 <= d <= 10 for d in delays), delays
    assert len(set(delays)) > 1, "no jitter: every retry lands at once"
    # None of them is claimable while waiting.
    assert queue.claim(conn, FLOW, "pod", 20, 60) == []
    counts = queue.stats(conn, FLOW)[FLOW]
    assert counts["pending_records"] == 20 and counts["ready_records"] == 0

    # The cap: the third attempt would wait 40 s, the cap holds it to 15 s.
    conn.execute("UPDATE processing_queue SET available_at = LOCALTIMESTAMP, retry_count = 2")
    capped = queue.RetryPolicy(max_retries=5, backoff_base=10, backoff_cap=15)
    again = queue.claim(conn, FLOW, "pod", 20, 60)
    for record in again:
        queue.fail(conn, record.id, record.claim_token, "x", policy=capped)
    delays = [delay_of(conn, r.id).total_seconds() for r in again]
    assert all(7.5 <= d <= 15 for d in delays), delays


def test_zero_retries_fails_at_once(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, FLOW, [{"n": 1}])
    (record,) = queue.claim(conn, FLOW, "pod", 1, 60)
    none = queue.RetryPolicy(max_retries=0)
    assert queue.fail(conn, record.id, record.claim_token, "bad data", policy=none) == "failed"
    assert conn.execute("SELECT status, retry_count FROM processing_queue").fetchone() == (
        "failed",
        0,
    )


def test_requeue_failed_gives_records_a_fresh_start(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, FLOW, [{"n": 1}, {"n": 2}])
    none = queue.RetryPolicy(max_retries=0)
    for record in queue.claim(conn, FLOW, "pod", 2, 60):
        queue.fail(conn, record.id, record.claim_token, "bad", policy=none)
    failed_ids = [r[0] for r in conn.execute("SELECT id FROM processing_queue ORDER BY id")]
    assert queue.requeue_failed(conn, FLOW, [failed_ids[0]]) == [failed_ids[0]]
    assert queue.requeue_failed(conn, "other_flow") == []
    (again,) = queue.claim(conn, FLOW, "pod", 5, 60)
    assert again.id == failed_ids[0] and again.retry_count == 0
    assert queue.requeue_failed(conn, FLOW) == [failed_ids[1]]


def test_processor_reads_max_retries_from_the_environment(
    db: DatabaseManager, conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVELOPMENT_DISTRIBUTED_PROCESSOR_MAX_RETRIES", "1")
    monkeypatch.setenv("DEVELOPMENT_DISTRIBUTED_PROCESSOR_RETRY_BACKOFF_SECONDS", "0")
    processor = DistributedProcessor(db, instance_id="pod")
    assert processor.policy.max_retries == 1
    processor.add_records_to_queue(FLOW, [{"n": 1}])

    (first,) = processor.claim_records_batch(FLOW, 1)
    assert processor.mark_record_failed(first["id"], "boom", error_details="trace 1") == "pending"
    (second,) = processor.claim_records_batch(FLOW, 1)
    assert second["id"] == first["id"] and second["retry_count"] == 1
    assert processor.mark_record_failed(second["id"], "boom", error_details="trace 2") == "failed"
    assert processor.claim_records_batch(FLOW, 1) == []
    assert conn.execute(
        "SELECT status, retry_count, error_message, error_details FROM processing_queue"
    ).fetchone() == ("failed", 1, "boom", "trace 2")

    # An explicit argument beats the environment.
    assert DistributedProcessor(db, max_retries=5).policy.max_retries == 5
    monkeypatch.setenv("DEVELOPMENT_DISTRIBUTED_PROCESSOR_MAX_RETRIES", "three")
    with pytest.raises(ValueError, match="DEVELOPMENT_DISTRIBUTED_PROCESSOR_MAX_RETRIES"):
        DistributedProcessor(db)


def test_processor_settings_follow_prefect_environment(
    db: DatabaseManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DatabaseManager resolves names in the environment current at call time; the
    # processor's own settings must come from that same environment.
    monkeypatch.setenv("PREFECT_ENVIRONMENT", "production")
    monkeypatch.setenv("PRODUCTION_DISTRIBUTED_PROCESSOR_MAX_RETRIES", "1")
    monkeypatch.setenv("DEVELOPMENT_DISTRIBUTED_PROCESSOR_MAX_RETRIES", "7")
    assert DistributedProcessor(db).policy.max_retries == 1


def test_seed_high_error_rates_query(db: DatabaseManager, conn: psycopg.Connection) -> None:
    processor = DistributedProcessor(db, instance_id="pod", max_retries=0)
    processor.add_records_to_queue(FLOW, [{"n": i} for i in range(6)])
    claimed = processor.claim_records_batch(FLOW, 6)
    for record in claimed[:3]:
        assert processor.mark_record_failed(record["id"], "timeout") == "failed"
    assert processor.mark_record_failed(claimed[3]["id"], "bad data") == "failed"
    processor.mark_record_completed(claimed[4]["id"])
    # An old failure is outside the 24 hour window.
    conn.execute(
        "UPDATE processing_queue SET updated_at = LOCALTIMESTAMP - interval '3 days',"
        " status = 'failed', error_message = 'ancient' WHERE id = %s",
        (claimed[5]["id"],),
    )

    errors = db.execute_query("rpa_db", HIGH_ERROR_RATES_SQL)
    assert errors == [("timeout", 3), ("bad data", 1)]

    out = io.StringIO()
    with redirect_stdout(out):
        for error, count in errors:
            print(f"{count}: {error}")
    assert out.getvalue().splitlines() == ["3: timeout", "1: bad data"]
