"""A database restart is not a worker death.

Two workers (two claim loops each) drain records while their PostgreSQL server is
stopped three times, each time for longer than a lease, and started again. Every worker
lives throughout. Before the fix each restart counted as an abandon for every record in
flight (the loops dropped their batches, finished or not, and the leases ran out while
nobody could renew them), so three restarts failed healthy records as "abandoned 3
times", each having run to the end three times. Now a loop keeps its batch through the
outage and settles it when the server is back (completing what it processed: the claim
tokens say what is still its own), the keepers renew first, and leases count as run out
only once the server has been up a lease's length.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
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
from flowfleet.migrate import migrate
from flowfleet.throwaway import ThrowawayPostgres

FLOW = "restart_flow"
RECORDS = 1_000
WORKERS = 2
CONCURRENCY = 2
LEASE = 2
DOWN_SECONDS = LEASE + 1.5  # every lease in flight runs out while the server is down
RESTARTS = 3
# Records that run through several restarts: before the fix, each restart took them for
# abandoned while they ran, and the third failed them.
SLOW = {"sleep": 10}
SLOW_KEYS = range(RECORDS, RECORDS + 2)


@pytest.fixture
def own_server() -> Iterator[ThrowawayPostgres]:
    """A server of this test's own: restarting the session's would cut every other
    test's connections."""
    with ThrowawayPostgres() as server:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            migrate(conn)
        yield server


def completed(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM processing_history").fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.slow
def test_three_database_restarts_fail_no_record_as_abandoned(
    fleet: Fleet, own_server: ThrowawayPostgres, tmp_path: Path
) -> None:
    dsn = own_server.dsn()
    effects = tmp_path / "effects.log"
    with psycopg.connect(dsn, autocommit=True) as conn:
        enqueue_keys(conn, FLOW, SLOW_KEYS, **SLOW)
        enqueue_keys(conn, FLOW, range(RECORDS))
    workers = [
        fleet.start(
            FLOW,
            "processors.faults:append_log_after",
            dsn,
            name=f"restart-{i}",
            lease_seconds=LEASE,
            args=["--batch-size", "5", "--concurrency", str(CONCURRENCY)],
            env={"FLOWFLEET_TEST_LOG": str(effects), "FLOWFLEET_TEST_SLEEP": "0.05"},
        )
        for i in range(WORKERS)
    ]
    for restart in range(RESTARTS):
        threshold = RECORDS * (restart + 1) // (RESTARTS + 2)
        wait_until(lambda t=threshold: completed(dsn) >= t, 60, 0.1, f"{threshold} completions")
        own_server.restart(down_seconds=DOWN_SECONDS)
        assert all(w.alive() for w in workers), [w.stderr()[-2000:] for w in workers]
    assert completed(dsn) < RECORDS, "the work ran out before the last restart"

    with psycopg.connect(dsn, autocommit=True) as conn:
        drain_then_stop(conn, FLOW, workers, 90)
        history = conn.execute(
            "SELECT count(*), max(abandoned_count), sum(abandoned_count) FROM processing_history"
        ).fetchone()
        slow_abandons = conn.execute(
            "SELECT payload->>'k', abandoned_count FROM processing_history WHERE payload ? 'sleep'"
        ).fetchall()
        left = conn.execute("SELECT status, error_message FROM processing_queue").fetchall()
    assert not left, left  # nothing failed, as abandoned or otherwise
    assert history is not None
    count, most_abandoned, abandons = history
    assert count == RECORDS + len(SLOW_KEYS)
    # The slow records ran once, through every restart, and were never taken back.
    assert sorted(slow_abandons) == [(str(k), 0) for k in SLOW_KEYS]
    runs = Counter(effects.read_text().split())
    assert set(runs) == {str(k) for k in (*range(RECORDS), *SLOW_KEYS)}
    assert all(runs[str(k)] == 1 for k in SLOW_KEYS), runs
    reruns = sum(runs.values()) - RECORDS - len(SLOW_KEYS)
    print(f"restarts: {RESTARTS}, re-runs {reruns}, abandons {abandons} (max {most_abandoned})")
    # At most the records of a statement each loop had cut per restart run again, and
    # at most once counted as abandoned (a claim that committed as the server stopped,
    # its answer lost: its claimer never knew it held them).
    assert reruns <= RESTARTS * WORKERS * CONCURRENCY
    assert most_abandoned <= 1
    # The outage was reported, once per line ("cannot reach database ... at ...").
    outage_lines = [
        entry["msg"] for w in workers for entry in w.logs() if "cannot reach" in entry["msg"]
    ]
    assert outage_lines
    assert all(line.count("cannot reach database") == 1 for line in outage_lines), outage_lines


def test_a_worker_restarted_under_its_instance_id_returns_its_old_claims_at_once(
    fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    """A container restarted in the same pod (after an OOM kill, say) starts under the
    same instance id: what that id still holds was claimed by the process that died, and
    comes back now rather than when the lease runs out."""
    enqueue_keys(conn, FLOW, range(6))
    held = queue.claim(conn, FLOW, "pod-a", 3, 600)
    assert len(held) == 3
    worker = fleet.start(FLOW, "processors.effects:sleepy", dsn, name="pod-a", lease_seconds=600)
    # Within seconds, not the 600 s lease.
    drain_then_stop(conn, FLOW, [worker], 30)
    assert worker.logged("returned 3 records that pod-a held before this process started")
    abandoned = conn.execute(
        "SELECT id, abandoned_count FROM processing_history WHERE abandoned_count > 0 ORDER BY id"
    ).fetchall()
    assert abandoned == [(r.id, 1) for r in sorted(held, key=lambda r: r.id)]
