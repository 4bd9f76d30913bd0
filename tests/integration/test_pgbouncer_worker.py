"""Workers through PgBouncer in transaction mode: they drain, say once that they poll,
wake at once on a direct LISTEN connection when one is configured, and survive the chaos
test (SIGKILLs, replacements, exactly once) with every statement going through the pooler.
"""

from __future__ import annotations

import signal
import statistics
import time
from pathlib import Path

import psycopg
import pytest
from test_worker_chaos import (
    test_sigkill_loses_nothing_and_duplicates_only_what_victims_held as chaos,
)
from worker_helpers import (
    Fleet,
    drain_then_stop,
    enqueue_keys,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    queue_counts,
    wait_until,
)

from flowfleet import queue

FLOW = "bounced_flow"
POLLING = "transaction pooler, where LISTEN cannot work"


def test_workers_drain_through_the_pooler_and_say_once_that_they_poll(
    fleet: Fleet, bouncer_dsn: str, conn: psycopg.Connection
) -> None:
    workers = [
        fleet.start(
            FLOW,
            "processors.effects:sleepy",
            bouncer_dsn,
            args=["--batch-size", "20", "--concurrency", "4", "--poll-seconds", "0.2"],
        )
        for _ in range(3)
    ]
    # All running before the work arrives: a SIGTERM before start-up ends a worker
    # without its graceful path.
    for worker in workers:
        worker.wait_logged("worker started")
    enqueue_keys(conn, FLOW, range(3_000))
    drain_then_stop(conn, FLOW, workers, 120)
    assert queue_counts(conn, FLOW) == {
        "pending": 0,
        "processing": 0,
        "failed": 0,
        "completed": 3_000,
    }
    for worker in workers:
        said = [e for e in worker.logs() if POLLING in e.get("msg", "")]
        assert len(said) == 1, worker.stderr()
        assert "Traceback" not in worker.stderr(), worker.stderr()


def test_a_worker_through_the_pooler_wakes_on_its_direct_listen_connection(
    fleet: Fleet, bouncer_dsn: str, dsn: str, conn: psycopg.Connection
) -> None:
    conn.execute("CREATE TABLE starts (k text PRIMARY KEY, started float8 NOT NULL)")
    worker = fleet.start(
        FLOW,
        "processors.effects:stamp_start",
        bouncer_dsn,
        args=["--poll-seconds", "30"],
        env={"FLOWFLEET_TEST_DSN": dsn, "FLOWFLEET_LISTEN_DSN": dsn},
    )
    worker.wait_logged("worker started")
    time.sleep(0.5)  # idle, waiting on a 30 s poll
    latencies = []
    with psycopg.connect(bouncer_dsn, autocommit=True) as producer:
        for n in range(5):
            queue.enqueue(producer, FLOW, [{"k": f"r{n}"}])
            committed = time.time()

            def started(key: str = f"r{n}") -> float | None:
                row = conn.execute("SELECT started FROM starts WHERE k = %s", (key,)).fetchone()
                return None if row is None else float(row[0])

            latencies.append(wait_until(started, 10, 0.005, f"r{n} to start") - committed)
            time.sleep(0.1)
    assert statistics.median(latencies) < 0.5, latencies
    assert not worker.logged(POLLING)
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(10) == 0


@pytest.mark.slow
def test_chaos_through_the_pooler(
    fleet: Fleet, bouncer_dsn: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    """The chaos test itself, with the workers' every statement going through PgBouncer
    (three server connections for six workers): the checks read the database directly."""
    chaos(fleet, bouncer_dsn, conn, tmp_path)
