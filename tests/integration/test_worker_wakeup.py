"""Wake-ups: an idle worker starts new work on NOTIFY, not on its next poll; and
`flowfleet requeue`, which puts failed records back (and wakes workers too)."""

from __future__ import annotations

import signal
import statistics
import time

import psycopg
import pytest
from worker_helpers import (
    Fleet,
    WorkerProcess,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    run_cli,
    wait_until,
)

from flowfleet import queue

FLOW = "wake_flow"
POLL = "30"  # so that only a notification can wake the worker within a test's patience


def start_stamping_worker(fleet: Fleet, dsn: str, conn: psycopg.Connection) -> WorkerProcess:
    conn.execute("CREATE TABLE starts (k text PRIMARY KEY, started float8 NOT NULL)")
    worker = fleet.start(
        FLOW,
        "processors.effects:stamp_start",
        dsn,
        name="waker",
        args=["--poll-seconds", POLL],
        env={"FLOWFLEET_TEST_DSN": dsn},
    )
    worker.wait_logged("worker started")
    return worker


def started_at(conn: psycopg.Connection, key: str) -> float | None:
    row = conn.execute("SELECT started FROM starts WHERE k = %s", (key,)).fetchone()
    return None if row is None else float(row[0])


def test_idle_worker_wakes_on_enqueue(fleet: Fleet, dsn: str, conn: psycopg.Connection) -> None:
    worker = start_stamping_worker(fleet, dsn, conn)
    time.sleep(0.5)  # past its first, empty claim: idle, waiting on a 30 s poll
    latencies = []
    for n in range(10):
        queue.enqueue(conn, FLOW, [{"k": f"r{n}"}])  # commits and notifies on return
        committed = time.time()
        started = wait_until(lambda n=n: started_at(conn, f"r{n}"), 10, 0.005, f"r{n} to start")
        latencies.append(started - committed)
        time.sleep(0.1)  # idle again
    median = statistics.median(latencies)
    print(
        f"enqueue-commit -> start: median {median * 1000:.1f} ms, max {max(latencies) * 1000:.1f}"
    )
    assert median < 0.5, latencies
    assert max(latencies) < 5, latencies  # never the 30 s poll
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(10) == 0


def make_failed(conn: psycopg.Connection, flow: str, count: int) -> list[int]:
    """Records that spent their one retry and failed for good, through the queue API."""
    policy = queue.RetryPolicy(max_retries=1, backoff_base=0, backoff_cap=0)
    queue.enqueue(conn, flow, [{"k": f"{flow}-{n}"} for n in range(count)])
    for _ in range(2):
        for record in queue.claim(conn, flow, "test", count, 60):
            queue.fail(conn, record.id, record.claim_token, "boom", policy=policy)
    rows = conn.execute(
        "SELECT id, status, retry_count FROM processing_queue WHERE flow_name = %s ORDER BY id",
        (flow,),
    ).fetchall()
    assert [(status, retries) for _, status, retries in rows] == [("failed", 1)] * count
    return [row[0] for row in rows]


def states(conn: psycopg.Connection, flow: str) -> dict[int, tuple[str, int]]:
    return {
        row[0]: (row[1], row[2])
        for row in conn.execute(
            "SELECT id, status, retry_count FROM processing_queue WHERE flow_name = %s",
            (flow,),
        )
    }


def test_requeue_by_id_and_all_failed(dsn: str, conn: psycopg.Connection) -> None:
    ids = make_failed(conn, FLOW, 4)
    other = make_failed(conn, "other_flow", 2)

    code, out, err = run_cli(
        ["requeue", FLOW, "--id", str(ids[0]), "--id", str(ids[2]), "--dsn", dsn]
    )
    assert (code, err) == (0, "")
    assert out.strip() == f"requeued 2 failed records of {FLOW}"
    assert states(conn, FLOW) == {
        ids[0]: ("pending", 0),
        ids[1]: ("failed", 1),
        ids[2]: ("pending", 0),
        ids[3]: ("failed", 1),
    }
    # A record that is not failed is left alone.
    code, out, _ = run_cli(["requeue", FLOW, "--id", str(ids[0]), "--dsn", dsn])
    assert (code, out.strip()) == (0, f"requeued 0 failed records of {FLOW}")

    code, out, _ = run_cli(["requeue", FLOW, "--all-failed", "--dsn", dsn])
    assert (code, out.strip()) == (0, f"requeued 2 failed records of {FLOW}")
    assert set(states(conn, FLOW).values()) == {("pending", 0)}
    # Another flow's failures are not ours to requeue.
    assert set(states(conn, "other_flow").values()) == {("failed", 1)}
    assert sorted(states(conn, "other_flow")) == other


@pytest.mark.parametrize("args", [[], ["--id"]], ids=["nothing", "id-without-value"])
def test_requeue_without_a_selection_exits_2(
    dsn: str, conn: psycopg.Connection, args: list[str]
) -> None:
    make_failed(conn, FLOW, 1)
    code, _, err = run_cli(["requeue", FLOW, *args, "--dsn", dsn])
    assert code == 2
    if not args:
        assert err.strip() == "flowfleet: say which records: --id ID (repeatable) or --all-failed"
    assert set(states(conn, FLOW).values()) == {("failed", 1)}


def test_requeue_wakes_an_idle_worker(fleet: Fleet, dsn: str, conn: psycopg.Connection) -> None:
    (failed,) = make_failed(conn, FLOW, 1)
    worker = start_stamping_worker(fleet, dsn, conn)
    time.sleep(0.5)
    code, _, _ = run_cli(["requeue", FLOW, "--all-failed", "--dsn", dsn])
    requeued = time.time()
    assert code == 0
    started = wait_until(lambda: started_at(conn, f"{FLOW}-0"), 10, 0.01, "the requeued record")
    assert started - requeued < 5  # a notification, not the 30 s poll
    wait_until(
        lambda: (
            conn.execute(
                "SELECT retry_count FROM processing_history WHERE id = %s", (failed,)
            ).fetchone()
            == (0,)
        ),
        10,
        what="the requeued record to complete",
    )
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(10) == 0
