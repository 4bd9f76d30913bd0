"""Fencing: a late answer from a claimer whose claim was taken back changes nothing."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from flowfleet import queue
from flowfleet.database import DatabaseManager
from flowfleet.distributed import DistributedProcessor

FLOW = "fenced_flow"


def row(conn: psycopg.Connection, record_id: int) -> dict[str, Any]:
    cur = conn.execute(
        "SELECT status, flow_instance_id, claim_token, retry_count, error_message"
        " FROM processing_queue WHERE id = %s",
        (record_id,),
    )
    found = cur.fetchone()
    assert found is not None, f"record {record_id} left the queue"
    assert cur.description is not None
    return dict(zip([c.name for c in cur.description], found, strict=True))


def history_ids(conn: psycopg.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM processing_history ORDER BY id")]


def take_back_after_lease(conn: psycopg.Connection) -> tuple[queue.Claimed, queue.Claimed]:
    """A claims with a short lease that runs out; the sweep takes it back; B re-claims."""
    queue.enqueue(conn, FLOW, [{"doc": "only"}])
    (a,) = queue.claim(conn, FLOW, "pod-a", 1, 0.4)
    # Not yet expired: a sweep with a long timeout leaves the claim alone.
    assert queue.release_orphans(conn, timeout_seconds=3600) == []
    time.sleep(0.5)
    assert queue.release_orphans(conn, timeout_seconds=3600) == [a.id]
    (b,) = queue.claim(conn, FLOW, "pod-b", 1, 60)
    assert b.id == a.id
    assert b.claim_token != a.claim_token
    assert b.retry_count == 0  # taking a claim back spends no retry
    return a, b


def test_stale_completion_changes_nothing(conn: psycopg.Connection) -> None:
    a, b = take_back_after_lease(conn)

    assert queue.complete(conn, [a]) == []
    assert queue.complete(conn, [(a.id, a.claim_token)], [{"from": "a"}]) == []
    assert queue.complete_and_claim(conn, [a], FLOW, "pod-a", 10, 60) == []
    assert queue.release(conn, [a]) == []
    assert queue.heartbeat(conn, [a], 600) == 0
    assert history_ids(conn) == []
    assert row(conn, a.id) == {
        "status": "processing",
        "flow_instance_id": "pod-b",
        "claim_token": b.claim_token,
        "retry_count": 0,
        "error_message": None,
    }

    assert queue.complete(conn, [b], [{"from": "b"}]) == [b.id]
    assert history_ids(conn) == [b.id]
    done = conn.execute(
        "SELECT status, flow_instance_id, result FROM processing_records WHERE id = %s", (b.id,)
    ).fetchone()
    assert done == ("completed", "pod-b", {"from": "b"})
    assert conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (0,)


def test_stale_failure_changes_nothing(conn: psycopg.Connection) -> None:
    a, b = take_back_after_lease(conn)
    policy = queue.RetryPolicy(max_retries=3, backoff_base=0.05, backoff_cap=1)

    assert queue.fail(conn, a.id, a.claim_token, "late failure", policy=policy) is None
    # The instance-id fallback (no token) is fenced too: pod-a no longer holds it.
    assert queue.fail(conn, a.id, None, "late failure", instance_id="pod-a", policy=policy) is None
    assert row(conn, a.id) == {
        "status": "processing",
        "flow_instance_id": "pod-b",
        "claim_token": b.claim_token,
        "retry_count": 0,
        "error_message": None,
    }
    assert queue.fail(conn, b.id, b.claim_token, "real failure", policy=policy) == "pending"
    assert row(conn, b.id)["retry_count"] == 1


def test_completion_after_a_completion_is_refused(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, FLOW, [{"n": 1}])
    (a,) = queue.claim(conn, FLOW, "pod-a", 1, 60)
    assert queue.complete(conn, [a]) == [a.id]
    assert queue.complete(conn, [a]) == []
    assert queue.fail(conn, a.id, a.claim_token, "after the fact") is None
    assert history_ids(conn) == [a.id]


def test_a_mixed_batch_completes_only_the_records_still_ours(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, FLOW, [{"n": i} for i in range(4)])
    batch = queue.claim(conn, FLOW, "pod-a", 4, 60)
    lost = batch[0]
    conn.execute(
        "UPDATE processing_queue SET claim_token = nextval('processing_queue_claim_token_seq'),"
        " flow_instance_id = 'pod-b' WHERE id = %s",
        (lost.id,),
    )
    done = queue.complete(conn, batch)
    assert sorted(done) == sorted(r.id for r in batch[1:])
    assert row(conn, lost.id)["flow_instance_id"] == "pod-b"


def test_sweep_by_claim_age_and_by_flow(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, "f1", [{"n": 1}])
    queue.enqueue(conn, "f2", [{"n": 2}])
    (one,) = queue.claim(conn, "f1", "pod-a", 1, 3600)
    (two,) = queue.claim(conn, "f2", "pod-a", 1, 3600)
    time.sleep(0.05)
    # Leases are long; only the claim-age timeout applies, and only to the named flow.
    assert queue.release_orphans(conn, timeout_seconds=3600) == []
    assert queue.release_orphans(conn, timeout_seconds=0.01, flow_name="f1") == [one.id]
    assert row(conn, two.id)["status"] == "processing"
    assert queue.release_orphans(conn, timeout_seconds=0.01) == [two.id]


@pytest.fixture
def processors(db: DatabaseManager) -> tuple[DistributedProcessor, DistributedProcessor]:
    return (
        DistributedProcessor(db, instance_id="pod-a", lease_seconds=0.1),
        DistributedProcessor(db, instance_id="pod-b"),
    )


def test_processor_completion_after_take_back_returns_false(
    processors: tuple[DistributedProcessor, DistributedProcessor], conn: psycopg.Connection
) -> None:
    a, b = processors
    a.add_records_to_queue(FLOW, [{"doc": 1}])
    (mine,) = a.claim_records_batch(FLOW, 5)
    time.sleep(0.25)
    assert b.cleanup_orphaned_records() == 1  # lease expired; the 2 h timeout did not
    (theirs,) = b.claim_records_batch(FLOW, 5)
    assert theirs["id"] == mine["id"]

    assert a.mark_record_completed(mine["id"], {"by": "a"}) is False
    assert a.mark_record_completed(mine["id"], claim_token=mine["claim_token"]) is False
    # A fresh processor with A's identity (the token is lost) is fenced by instance id.
    assert (
        DistributedProcessor(a.queue_db, instance_id="pod-a").mark_record_completed(mine["id"])
        is False
    )
    assert a.mark_record_failed(mine["id"], "late") is None
    assert row(conn, mine["id"])["flow_instance_id"] == "pod-b"
    assert row(conn, mine["id"])["retry_count"] == 0
    assert history_ids(conn) == []

    assert b.mark_record_completed(theirs["id"], {"by": "b"}) is True
    assert b.mark_record_completed(theirs["id"]) is False  # only once
    assert conn.execute(
        "SELECT flow_instance_id, result FROM processing_history WHERE id = %s", (theirs["id"],)
    ).fetchone() == ("pod-b", {"by": "b"})


def test_processor_without_the_token_completes_by_instance(db: DatabaseManager) -> None:
    producer = DistributedProcessor(db, instance_id="producer")
    producer.add_records_to_queue(FLOW, [{"doc": 1}])
    (claimed,) = DistributedProcessor(db, instance_id="pod-a").claim_records_batch(FLOW, 1)
    assert (
        DistributedProcessor(db, instance_id="pod-b").mark_record_completed(claimed["id"]) is False
    )
    assert (
        DistributedProcessor(db, instance_id="pod-a").mark_record_completed(claimed["id"]) is True
    )


def test_seed_cleanup_returns_the_count_and_spends_no_retry(
    db: DatabaseManager, conn: psycopg.Connection
) -> None:
    processor = DistributedProcessor(db, instance_id="pod-a")
    processor.add_records_to_queue(FLOW, [{"n": i} for i in range(5)])
    claimed = processor.claim_records_batch(FLOW, 3)
    assert len(claimed) == 3
    # Default: 2 h timeout and a 2 h lease; a fresh claim is not an orphan.
    assert processor.cleanup_orphaned_records() == 0
    time.sleep(0.01)
    assert processor.cleanup_orphaned_records(timeout_hours=0) == 3
    rows = conn.execute(
        "SELECT status, retry_count, flow_instance_id, claim_token, count(*)"
        " FROM processing_queue GROUP BY 1, 2, 3, 4"
    ).fetchall()
    assert rows == [("pending", 0, None, None, 5)]
    assert processor.cleanup_orphaned_records(timeout_hours=0) == 0
    # The released claims are fenced: the old holder cannot complete them.
    assert processor.mark_record_completed(claimed[0]["id"]) is False
    assert processor.get_queue_status(FLOW)["pending_records"] == 5
