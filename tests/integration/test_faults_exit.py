"""``sys.exit()`` (SystemExit) inside a processor.

It used to end its claim loop's thread silently (a thread ends quietly on SystemExit):
the keeper went on renewing the batch the loop held, so those records stayed
``processing`` under a live lease for good, and SIGTERM later exited 0 without releasing
them. Now the record that exited is failed (a retry spent, its message stored), the
records of its batch it had finished are completed and the rest handed back, and the
worker stops, lets its other loop finish, and exits non-zero so that it is restarted.
"""

from __future__ import annotations

import psycopg
import pytest
from conftest_prefect import prefect_api_fixture  # noqa: F401 - fixture
from worker_helpers import (
    Fleet,
    drain_then_stop,
    enqueue_keys,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    queue_counts,
)

from flowfleet import queue
from flowfleet.throwaway import ThrowawayPrefect

FLOW = "exit_flow"


def test_system_exit_in_a_processor_fails_its_record_and_ends_the_worker_non_zero(
    fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    exit_ends_the_worker(fleet, dsn, conn, "plain", {})


@pytest.mark.slow
def test_system_exit_under_the_prefect_runner(
    prefect_api: ThrowawayPrefect, fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    exit_ends_the_worker(fleet, dsn, conn, "prefect", prefect_api.env())


def exit_ends_the_worker(
    fleet: Fleet, dsn: str, conn: psycopg.Connection, runner: str, env: dict[str, str]
) -> None:
    queue.enqueue(conn, FLOW, [{"k": k, "exit": k == 3} for k in range(8)])
    worker = fleet.start(
        FLOW,
        "processors.faults:exit_on",
        dsn,
        runner=runner,
        args=["--batch-size", "8", "--max-retries", "0", "--concurrency", "2"],
        env={"FLOWFLEET_TEST_SLEEP": "0.05", **env},
    )
    assert worker.wait_exit(30) != 0, worker.stderr()[-3000:]
    assert worker.logged("ended by SystemExit")

    failed = conn.execute(
        "SELECT payload->>'k', error_message FROM processing_queue WHERE status = 'failed'"
    ).fetchall()
    assert failed == [("3", "SystemExit: 3")]
    # Finished records completed, the rest handed back: nothing left claimed.
    counts = queue_counts(conn, FLOW)
    assert counts["processing"] == 0
    assert counts["completed"] == 3 and counts["pending"] == 4, counts
    assert conn.execute(
        "SELECT count(*) FROM processing_queue"
        " WHERE status = 'pending' AND (abandoned_count > 0 OR retry_count > 0)"
    ).fetchone() == (0,)

    # Another worker finishes the rest; the record that exited stays failed.
    enqueue_keys(conn, FLOW, range(8, 12))
    successor = fleet.start(FLOW, "processors.faults:exit_on", dsn, runner=runner, env=env)
    drain_then_stop(conn, FLOW, [successor], 30)
    counts = queue_counts(conn, FLOW)
    assert (counts["completed"], counts["failed"]) == (11, 1), counts
