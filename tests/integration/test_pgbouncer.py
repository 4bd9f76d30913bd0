"""The queue through PgBouncer in transaction mode: every transaction may run on another
server connection, so nothing may rest on session state (prepared statements, the time
zone, temporary tables, LISTEN)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from flowfleet import queue
from flowfleet.database import DatabaseManager, behind_pooler
from flowfleet.throwaway import ThrowawayPgBouncer
from flowfleet.wakeups import WakeUps, wake_on_enqueues

FLOW = "bounced"


@pytest.fixture
def bounced(bouncer_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[DatabaseManager]:
    monkeypatch.delenv("FLOWFLEET_PGBOUNCER", raising=False)
    monkeypatch.delenv("FLOWFLEET_LISTEN_DSN", raising=False)
    manager = DatabaseManager("queue", connection_string=bouncer_dsn)
    yield manager
    manager.close()


def test_the_pooler_is_detected_and_a_direct_server_is_not(
    bouncer_dsn: str, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWFLEET_PGBOUNCER", raising=False)
    with psycopg.connect(bouncer_dsn, autocommit=True) as conn:
        assert behind_pooler(conn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert not behind_pooler(conn)
    assert DatabaseManager("queue", connection_string=bouncer_dsn).pooled
    assert not DatabaseManager("queue", connection_string=dsn).pooled
    monkeypatch.setenv("FLOWFLEET_PGBOUNCER", "0")
    assert not DatabaseManager("queue", connection_string=bouncer_dsn).pooled
    monkeypatch.setenv("FLOWFLEET_PGBOUNCER", "1")
    assert DatabaseManager("queue", connection_string=dsn).pooled


def test_many_claimers_through_few_server_connections_claim_each_record_once(
    bounced: DatabaseManager, conn: psycopg.Connection
) -> None:
    """Twelve dedicated connections repeat the same statements (psycopg would prepare
    them after five) over three server connections."""
    total = 3_000
    with bounced.connection() as c:
        assert queue.enqueue(c, FLOW, [{"n": n} for n in range(total)]) == total

    def drain(index: int) -> list[int]:
        taken: list[int] = []
        with bounced.connect() as own:
            batch = queue.claim(own, FLOW, f"pod-{index}", 10, 60)
            while batch:
                taken += [r.id for r in batch]
                batch = queue.complete_and_claim(own, batch, FLOW, f"pod-{index}", 10, 60)
        return taken

    with ThreadPoolExecutor(12) as pool:
        claimed = [i for part in pool.map(drain, range(12)) for i in part]
    assert len(claimed) == total
    assert len(set(claimed)) == total
    assert conn.execute("SELECT count(*) FROM processing_history").fetchone() == (total,)
    assert conn.execute("SELECT count(*) FROM processing_queue").fetchone() == (0,)


def test_copy_enqueue_with_dedup_keys_and_delay_through_the_pooler(
    bounced: DatabaseManager, conn: psycopg.Connection
) -> None:
    """The dedup path stages rows in a temporary table: it must live and die inside the
    enqueue's transaction, whatever server connection the next enqueue gets."""

    def enqueue(keys: range) -> int:
        with bounced.connection() as c:
            return queue.enqueue(c, FLOW, [{"k": k} for k in keys], dedup_key="k", priority=2)

    with ThreadPoolExecutor(6) as pool:
        counts = list(pool.map(enqueue, [range(0, 100), range(50, 150)] * 6))
    assert sum(counts) == 150
    with bounced.connection() as c:
        assert queue.enqueue(c, "later", [{"x": 1}], delay_seconds=3600) == 1
        assert queue.claim(c, "later", "pod", 10, 60) == []
    rows = conn.execute(
        "SELECT count(*), count(DISTINCT dedup_key), min(priority) FROM processing_queue"
        " WHERE flow_name = %s",
        (FLOW,),
    ).fetchone()
    assert rows == (150, 150, 2)


def test_sessions_in_other_time_zones_agree_on_due_and_lease_times(
    bouncer_dsn: str, dsn: str, bounced: DatabaseManager, conn: psycopg.Connection
) -> None:
    """Through a pooler nobody sets the session's zone: a database whose default zone is
    14 hours east must still see records due now as due, and leases as running."""
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    conn.execute(f"ALTER DATABASE {dbname} SET timezone = 'Pacific/Kiritimati'")
    with psycopg.connect(bouncer_dsn, autocommit=True) as east:
        assert east.execute("SHOW TimeZone").fetchone() == ("Pacific/Kiritimati",)
        queue.enqueue(east, FLOW, [{"n": 1}, {"n": 2}])
    # A direct session in UTC claims what the eastern session enqueued a moment ago ...
    claimed = queue.claim(conn, FLOW, "pod", 1, 60)
    assert len(claimed) == 1
    with psycopg.connect(bouncer_dsn, autocommit=True) as east:
        # ... and the eastern session neither takes its 60 s lease for expired nor
        # misses the other record, due now.
        assert queue.release_orphans(east, None, FLOW) == []
        assert len(queue.claim(east, FLOW, "pod-east", 5, 60)) == 1


def test_status_and_migrate_through_the_pooler(
    bounced: DatabaseManager, empty_dsn: str, pgbouncer: ThrowawayPgBouncer
) -> None:
    from flowfleet.migrate import current_version, migrate
    from flowfleet.sql import latest_version

    with bounced.connection() as c:
        queue.enqueue(c, FLOW, [{"n": n} for n in range(5)])
        for _ in range(8):  # past psycopg's prepare threshold
            counts = queue.stats(c, FLOW)
    assert counts[FLOW]["pending_records"] == 5
    target = pgbouncer.dsn(str(psycopg.conninfo.conninfo_to_dict(empty_dsn)["dbname"]))
    fresh = DatabaseManager("fresh", connection_string=target)
    try:
        with fresh.connection() as c:
            migrate(c)
            assert current_version(c) == latest_version()
    finally:
        fresh.close()


def test_no_listen_through_the_pooler_is_said_once(
    bounced: DatabaseManager, caplog: pytest.LogCaptureFixture
) -> None:
    stopping = threading.Event()
    with caplog.at_level(logging.INFO, logger="flowfleet.worker"):
        wake_on_enqueues(bounced, FLOW, WakeUps(), stopping)  # returns at once
    said = [r.message for r in caplog.records if "transaction pooler" in r.message]
    assert len(said) == 1
    assert "FLOWFLEET_LISTEN_DSN" in said[0]


def test_listen_on_the_direct_connection_when_configured(
    bounced: DatabaseManager, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWFLEET_LISTEN_DSN", dsn)
    wakeups, stopping = WakeUps(), threading.Event()
    listener = threading.Thread(
        target=wake_on_enqueues, args=(bounced, FLOW, wakeups, stopping), daemon=True
    )
    listener.start()
    try:
        # The listener bumps once when it is listening; then an enqueue through the
        # pooler (its NOTIFY commits with it) must wake it.
        assert wakeups.wait(0, 10, stopping)
        seen = wakeups.generation
        with bounced.connection() as c:
            queue.enqueue(c, FLOW, [{"n": 1}])
        assert wakeups.wait(seen, 10, stopping)
    finally:
        stopping.set()
        listener.join(5)


def test_retention_through_the_pooler_deletes_old_history_in_short_batches(
    bounced: DatabaseManager, conn: psycopg.Connection
) -> None:
    for flow in ("a", "b"):
        queue.enqueue(conn, flow, [{"n": n} for n in range(10)])
        queue.complete(conn, queue.claim(conn, flow, "pod", 10, 60))
    conn.execute(
        "UPDATE processing_history SET completed_at = completed_at - interval '2 days'"
        " WHERE (payload->>'n')::int < 7"
    )
    with bounced.connection() as c:
        batches = list(queue.cleanup_completed_batches(c, 86400, batch_size=3, pause_factor=0))
    assert [b.deleted for b in batches] == [3, 3, 1, 3, 3, 1]
    left = conn.execute(
        "SELECT flow_name, count(*) FROM processing_history GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert left == [("a", 3), ("b", 3)]
    with bounced.connection() as c:
        assert queue.cleanup_completed(c, 86400) == 0
