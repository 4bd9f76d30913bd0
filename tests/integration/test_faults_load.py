"""No fault, no re-run: a busy fleet runs every record once and PostgreSQL sees no deadlock.

Six workers with four claim loops each drain 200,000 records that take 0.2 ms each, under
2 s leases, so claims, completions, lease renewals and orphan sweeps overlap all the time.
Before the fix this mix deadlocked ``complete_and_claim`` statements against each other in
every run (a claim's scan locking rows other workers had just claimed, then waiting to
delete its own), and each losing worker released a batch it had already processed: some
hundreds of records ran twice.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from worker_helpers import (
    Fleet,
    drain_then_stop,
    enqueue_keys,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    wait_until,
)

from flowfleet import queue
from flowfleet.throwaway import ThrowawayPostgres

FLOW = "load_flow"
RECORDS = 200_000
WORKERS = 6
CONCURRENCY = 4
BATCH = 50
WORK_SECONDS = "0.0002"


def server_log_since(server: ThrowawayPostgres, offset: int) -> str:
    with (server.root / "server.log").open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


@pytest.mark.slow
def test_busy_fleet_without_faults_runs_each_record_once_and_never_deadlocks(
    fleet: Fleet,
    dsn: str,
    conn: psycopg.Connection,
    pg_server: ThrowawayPostgres,
    tmp_path: Path,
) -> None:
    log_offset = (pg_server.root / "server.log").stat().st_size
    effects = tmp_path / "effects.log"
    enqueue_keys(conn, FLOW, range(RECORDS))
    started = time.monotonic()
    workers = [
        fleet.start(
            FLOW,
            "processors.effects:append_log",
            dsn,
            name=f"load-{i}",
            lease_seconds=2,
            args=["--batch-size", str(BATCH), "--concurrency", str(CONCURRENCY)],
            env={"FLOWFLEET_TEST_LOG": str(effects), "FLOWFLEET_TEST_SLEEP": WORK_SECONDS},
        )
        for i in range(WORKERS)
    ]
    drain_then_stop(conn, FLOW, workers, 120)
    elapsed = time.monotonic() - started

    server_log = server_log_since(pg_server, log_offset)
    deadlocks = [line for line in server_log.splitlines() if "deadlock detected" in line]
    assert not deadlocks, server_log[:5000]

    runs = Counter(effects.read_text().split())
    assert set(runs) == {str(k) for k in range(RECORDS)}
    reruns = {key: n for key, n in runs.items() if n > 1}
    assert not reruns, f"{len(reruns)} records ran more than once, e.g. {list(reruns)[:5]}"
    # Nothing was retried or taken back as abandoned: no worker lost a lease.
    assert conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE abandoned_count > 0 OR retry_count > 0)"
        " FROM processing_history WHERE flow_name = %s",
        (FLOW,),
    ).fetchone() == (RECORDS, 0)
    for worker in workers:
        assert not worker.logged("connection lost"), worker.stderr()[-3000:]
    print(f"load: {RECORDS} records, {WORKERS}x{CONCURRENCY} loops in {elapsed:.1f}s")


def test_a_serialization_failure_is_retried_as_a_statement_error(
    dsn: str, conn: psycopg.Connection, pg_server: ThrowawayPostgres
) -> None:
    """Under REPEATABLE READ (a site default, say), a row updated by a transaction that
    commits while the statement waits for it fails the statement with 40001; it ran as
    its own transaction, so it runs again, on the same connection."""
    log_offset = (pg_server.root / "server.log").stat().st_size
    conn.execute("SET default_transaction_isolation TO 'repeatable read'")
    queue.enqueue(conn, FLOW, [{"k": 1}])
    (record,) = queue.claim(conn, FLOW, "me", 1, 60)
    with psycopg.connect(dsn) as other:
        other.execute("UPDATE processing_queue SET updated_at = now() WHERE id = %s", (record.id,))
        outcome: list[str | None] = []
        failing = threading.Thread(
            target=lambda: outcome.append(queue.fail(conn, record.id, record.claim_token, "x"))
        )
        failing.start()
        wait_until(
            lambda: (
                other.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                ).fetchone()
                == (1,)
            ),
            10,
            what="fail() to wait for the row",
        )
        other.commit()
        failing.join(10)
    assert outcome == ["pending"]
    assert "could not serialize access" in server_log_since(pg_server, log_offset)
    assert not conn.broken
