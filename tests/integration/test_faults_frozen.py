"""One frozen worker never stalls the fleet.

A worker is stopped (SIGSTOP) between its completion statement and the commit of that
completion: its transaction stays open and holds the record's row lock, as a paused VM or
a stuck network would leave it. The other workers' lease keepers used to block on that
lock in ``release_orphans``, renew nothing, and fail ``/healthz`` ("lease keeper stuck"):
Kubernetes would have restarted the whole fleet. Now the keepers skip locked rows, the
frozen worker's other records come back when their leases run out, and the server ends
the frozen transaction after its idle-in-transaction timeout, after which the record it
held comes back too.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from worker_helpers import (
    Fleet,
    WorkerProcess,
    drain_then_stop,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    wait_until,
)

from flowfleet import queue

FLOW = "frozen_flow"
ENTRYPOINT = "processors.faults:freeze_before_commit"
LEASE = 2
# Longer than /healthz gives a silent keeper (3 renewals + 5 s): a keeper that waited on
# the frozen lock would be reported stuck well before the server ends the transaction.
IDLE_TIMEOUT = 14
SLOW_RECORDS = 28
SLOW_SECONDS = 2.5  # longer than the lease: finishing them needs renewals

pytestmark = pytest.mark.slow


def stopped(worker: WorkerProcess) -> bool:
    stat = Path(f"/proc/{worker.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def completed_at(conn: psycopg.Connection, k: int) -> float | None:
    row = conn.execute(
        "SELECT extract(epoch FROM completed_at)::float8 FROM processing_history"
        " WHERE flow_name = %s AND (payload->>'k')::int = %s",
        (FLOW, k),
    ).fetchone()
    return None if row is None else float(row[0])


def test_a_frozen_worker_stalls_only_its_own_records(
    fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    # The victim claims the freezing record and four others in one batch.
    queue.enqueue(conn, FLOW, [{"k": 0, "freeze": True}, *({"k": k} for k in range(1, 5))])
    victim = fleet.start(
        FLOW,
        ENTRYPOINT,
        dsn,
        name="victim",
        lease_seconds=LEASE,
        args=["--batch-size", "5"],
        env={
            "FLOWFLEET_TEST_FREEZE": "1",
            "PGOPTIONS": f"-c idle_in_transaction_session_timeout={IDLE_TIMEOUT}s",
        },
    )
    wait_until(lambda: stopped(victim), 20, 0.05, "the victim to stop itself")
    frozen_at = time.time()
    held = conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND state = 'idle in transaction'"
    ).fetchone()
    assert held == (1,), "the victim froze outside its transaction"

    queue.enqueue(conn, FLOW, [{"k": k, "sleep": SLOW_SECONDS} for k in range(5, 5 + SLOW_RECORDS)])
    healthy = [
        fleet.start(
            FLOW,
            ENTRYPOINT,
            dsn,
            name=f"healthy-{i}",
            http=True,
            lease_seconds=LEASE,
            args=["--batch-size", "1", "--concurrency", "2"],
        )
        for i in range(2)
    ]
    for worker in healthy:
        worker.wait_http()

    unhealthy: list[str] = []
    while completed_at(conn, 0) is None:
        assert time.time() - frozen_at < IDLE_TIMEOUT + 20, "the frozen record never came back"
        for worker in healthy:
            answer = worker.get("/healthz", timeout=5)
            if answer.status != 200:
                unhealthy.append(f"{worker.name}: {answer.status} {answer.body}")
        time.sleep(0.5)
    assert not unhealthy, unhealthy

    drain_then_stop(conn, FLOW, healthy, 60)
    # The records the victim held unlocked came back at lease expiry, long before the
    # server ended its transaction; the locked one only after that.
    unlocked_back = max(completed_at(conn, k) or 0.0 for k in range(1, 5))
    assert unlocked_back - frozen_at < IDLE_TIMEOUT
    assert (completed_at(conn, 0) or 0.0) - frozen_at >= IDLE_TIMEOUT - 1
    history = conn.execute(
        "SELECT (payload->>'k')::int, abandoned_count, flow_instance_id"
        " FROM processing_history WHERE flow_name = %s ORDER BY 1",
        (FLOW,),
    ).fetchall()
    assert [k for k, _, _ in history] == list(range(5 + SLOW_RECORDS))
    # Only the victim's records were taken back; the healthy workers' slow records, each
    # longer than a lease, stayed theirs: their keepers kept renewing throughout.
    assert all(abandoned == (1 if k < 5 else 0) for k, abandoned, _ in history), history
    assert all(instance.startswith("healthy-") for _, _, instance in history)
