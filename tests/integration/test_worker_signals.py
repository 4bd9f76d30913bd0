"""SIGTERM and SIGINT: stop claiming, finish in-flight records within the grace period,
hand back whatever is left untouched, exit 0."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
import pytest
from worker_helpers import (
    Fleet,
    enqueue_keys,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    in_flight,
    queue_counts,
    wait_until,
)

FLOW = "drain_flow"
MARGIN = 3.0  # seconds beyond the grace period: process exit, interpreter teardown, CI noise


def left_in_queue(conn: psycopg.Connection) -> list[tuple[object, ...]]:
    return conn.execute(
        "SELECT status, retry_count, flow_instance_id, claim_token, lease_expires_at,"
        " error_message FROM processing_queue WHERE flow_name = %s ORDER BY id",
        (FLOW,),
    ).fetchall()


@pytest.mark.parametrize(
    ("sig", "entrypoint", "concurrency"),
    [
        (signal.SIGTERM, "processors.effects:sleepy", 1),
        (signal.SIGINT, "processors.effects:sleepy_result", 1),
        (signal.SIGTERM, "processors.effects:sleepy", 2),
    ],
    ids=["sigterm", "sigint-with-results", "sigterm-two-loops"],
)
def test_signal_finishes_the_batch_in_hand_and_exits_0(
    fleet: Fleet,
    dsn: str,
    conn: psycopg.Connection,
    sig: signal.Signals,
    entrypoint: str,
    concurrency: int,
) -> None:
    batch, grace, total = 10, 5.0, 100
    enqueue_keys(conn, FLOW, range(total), sleep=0.2)
    worker = fleet.start(
        FLOW,
        entrypoint,
        dsn,
        name="drainer",
        args=[
            "--batch-size",
            str(batch),
            "--grace-seconds",
            str(grace),
            "--concurrency",
            str(concurrency),
        ],
    )
    # Mid-run: a batch is done and the next ones are in hand.
    wait_until(lambda: queue_counts(conn, FLOW)["completed"] >= batch, 30, what="one batch")
    wait_until(lambda: len(in_flight(conn, "drainer")) == batch * concurrency, 10)
    done_before = queue_counts(conn, FLOW)["completed"]

    sent = time.monotonic()
    worker.send(sig)
    assert worker.wait_exit(grace + MARGIN) == 0, worker.stderr()
    assert time.monotonic() - sent < grace + MARGIN

    counts = queue_counts(conn, FLOW)
    assert counts["processing"] == 0
    assert in_flight(conn, "drainer") == []
    # The batches in hand finished (10 records take 2 s, well inside the grace period):
    # completions come in whole batches, and nothing new was claimed after the signal.
    assert counts["completed"] % batch == 0
    assert done_before < counts["completed"] <= done_before + 2 * batch * concurrency
    assert counts["completed"] + counts["pending"] == total
    # What was never claimed is untouched: pending, no retry spent, nobody's claim.
    assert set(left_in_queue(conn)) == {("pending", 0, None, None, None, None)}
    assert worker.logged(f"stopping: {sig.name}")
    assert worker.logged("worker stopped")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_record_outlasting_the_grace_period_is_released(
    fleet: Fleet, dsn: str, conn: psycopg.Connection, sig: signal.Signals
) -> None:
    grace = 1.0
    # The first record of the batch takes 30 s; nine quick ones wait behind it.
    enqueue_keys(conn, FLOW, [0], sleep=30)
    enqueue_keys(conn, FLOW, range(1, 10), sleep=0)
    worker = fleet.start(
        FLOW,
        "processors.effects:sleepy",
        dsn,
        name="stuck",
        args=["--batch-size", "10", "--grace-seconds", str(grace)],
    )
    wait_until(lambda: len(in_flight(conn, "stuck")) == 10, 20, what="the batch to be claimed")
    time.sleep(0.3)  # inside the 30 s record now

    sent = time.monotonic()
    worker.send(sig)
    assert worker.wait_exit(grace + MARGIN) == 0, worker.stderr()
    assert time.monotonic() - sent < grace + MARGIN

    # Handed back at once (not after the lease): pending, retries unspent, no claim.
    assert left_in_queue(conn) == [("pending", 0, None, None, None, None)] * 10
    assert queue_counts(conn, FLOW)["completed"] == 0
    assert worker.logged("grace period over: completed 0 processed records, released 10 others")


def test_records_processed_during_the_grace_period_are_completed_not_rerun(
    fleet: Fleet, dsn: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    """A batch too long for the grace period: the records it did process are completed,
    only the ones it never started go back; a second worker runs each of those once."""
    total, grace = 50, 3.0
    effects = tmp_path / "effects.log"
    env = {"FLOWFLEET_TEST_LOG": str(effects), "FLOWFLEET_TEST_SLEEP": "0.5"}
    enqueue_keys(conn, FLOW, range(total))
    worker = fleet.start(
        FLOW,
        "processors.effects:append_log",
        dsn,
        name="long-batch",
        env=env,
        args=["--batch-size", str(total), "--grace-seconds", str(grace)],
    )
    wait_until(lambda: effects.exists() and len(effects.read_text().split()) >= 2, 20)
    sent = time.monotonic()
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(grace + MARGIN) == 0, worker.stderr()
    assert time.monotonic() - sent < grace + MARGIN

    ran = effects.read_text().split()
    counts = queue_counts(conn, FLOW)
    assert 2 <= len(ran) < total
    assert counts["completed"] == len(ran)  # every record that ran is completed
    assert counts["pending"] == total - len(ran) and counts["processing"] == 0
    assert set(left_in_queue(conn)) == {("pending", 0, None, None, None, None)}

    env["FLOWFLEET_TEST_SLEEP"] = "0"
    second = fleet.start(
        FLOW, "processors.effects:append_log", dsn, env=env, args=["--exit-when-empty"]
    )
    assert second.wait_exit(30) == 0, second.stderr()
    runs = effects.read_text().split()
    assert sorted(map(int, runs)) == list(range(total))  # each record ran exactly once
