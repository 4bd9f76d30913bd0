"""A record whose worker keeps dying while holding it: claimed alone after the first
death, failed after max_abandons, and the records that shared its batches flow on."""

from __future__ import annotations

import time

import psycopg

from flowfleet import queue


def expire(conn: psycopg.Connection, instance_id: str) -> None:
    """What a SIGKILL leaves behind: the claimer's leases simply run out."""
    conn.execute(
        "UPDATE processing_queue SET lease_expires_at = LOCALTIMESTAMP - INTERVAL '1 second'"
        " WHERE flow_instance_id = %s AND status = 'processing'",
        (instance_id,),
    )


def test_a_record_that_kills_its_workers_fails_alone(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, "f", [{"n": n, "poison": n == 0} for n in range(10)])

    # Round 1: a worker claims the whole batch and dies (the poison record killed it).
    batch = queue.claim(conn, "f", "pod-1", 10, 60)
    assert len(batch) == 10
    expire(conn, "pod-1")
    assert len(queue.release_orphans(conn, max_abandons=3)) == 10
    counts = dict(
        conn.execute("SELECT abandoned_count, count(*) FROM processing_queue GROUP BY 1").fetchall()
    )
    assert counts == {1: 10}
    assert {r[0] for r in conn.execute("SELECT retry_count FROM processing_queue")} == {0}

    # From now on each suspect runs alone; the innocent ones complete one by one.
    pod = 2
    while True:
        claimed = queue.claim(conn, "f", f"pod-{pod}", 10, 60)
        if not claimed:
            break
        assert len(claimed) == 1
        (record,) = claimed
        if record.payload["poison"]:
            expire(conn, f"pod-{pod}")  # it kills this worker too
            queue.release_orphans(conn, max_abandons=3)
        else:
            assert queue.complete(conn, claimed) == [record.id]
        pod += 1

    failed = conn.execute(
        "SELECT payload->>'n', status, abandoned_count, retry_count, error_message"
        " FROM processing_queue"
    ).fetchall()
    assert len(failed) == 1
    n, status, abandoned, retries, message = failed[0]
    assert (n, status, abandoned, retries) == ("0", "failed", 3, 0)
    assert "abandoned 3 times" in message and "pod-" in message
    done = conn.execute("SELECT count(*) FROM processing_history").fetchone()
    assert done == (9,)


def test_new_records_still_batch_while_a_suspect_waits(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, "f", [{"n": 0}])
    queue.claim(conn, "f", "pod-1", 10, 60)
    expire(conn, "pod-1")
    queue.release_orphans(conn)
    queue.enqueue(conn, "f", [{"n": n} for n in range(1, 6)])
    # The suspect first, alone; then the fresh records as one batch.
    assert [r.payload["n"] for r in queue.claim(conn, "f", "a", 10, 60)] == [0]
    assert sorted(r.payload["n"] for r in queue.claim(conn, "f", "b", 10, 60)) == [1, 2, 3, 4, 5]


def test_requeue_clears_the_abandon_count(conn: psycopg.Connection) -> None:
    queue.enqueue(conn, "f", [{"n": 0}])
    for pod in range(3):
        queue.claim(conn, "f", f"pod-{pod}", 10, 60)
        expire(conn, f"pod-{pod}")
        queue.release_orphans(conn, max_abandons=3)
        time.sleep(0.01)
    assert conn.execute("SELECT status FROM processing_queue").fetchone() == ("failed",)
    assert len(queue.requeue_failed(conn, "f")) == 1
    assert conn.execute("SELECT status, abandoned_count FROM processing_queue").fetchone() == (
        "pending",
        0,
    )
