"""Exactly-once effects: a processor that takes ``conn`` writes in the transaction that
completes its record, so a SIGKILL mid-record leaves neither the effect nor the completion,
and the record's next run leaves both, once."""

from __future__ import annotations

import time

import psycopg
import pytest
from worker_helpers import (
    Fleet,
    WorkerProcess,
    drain_then_stop,
    enqueue_keys,
    fleet_fixture,  # noqa: F401 - the fixture `fleet`
    in_flight,
    queue_counts,
    wait_until,
)

from flowfleet import queue

FLOW = "effects_flow"


def history_keys(conn: psycopg.Connection) -> list[str]:
    return [
        row[0]
        for row in conn.execute(
            "SELECT payload->>'k' FROM processing_history WHERE flow_name = %s", (FLOW,)
        )
    ]


def effect_counts(conn: psycopg.Connection, table: str, column: str) -> dict[str, int]:
    return dict(
        conn.execute(f"SELECT {column}, count(*) FROM {table} GROUP BY {column}").fetchall()
    )


@pytest.mark.slow
def test_effects_commit_with_completions_through_kills(
    fleet: Fleet, dsn: str, conn: psycopg.Connection
) -> None:
    records, kills = 3_000, 5
    # No unique constraint: a duplicate effect must be visible, not rejected.
    conn.execute("CREATE TABLE effects (k text NOT NULL)")
    enqueue_keys(conn, FLOW, range(records))

    def start(name: str) -> WorkerProcess:
        return fleet.start(
            FLOW,
            "processors.effects:effect_in_transaction",
            dsn,
            name=name,
            lease_seconds=2,
            args=["--batch-size", "20"],
            env={"FLOWFLEET_TEST_SLEEP": "0.005"},
        )

    live = [start(f"fx-{i}") for i in range(4)]
    held = 0
    for kill in range(kills):
        threshold = records * (kill + 1) // (kills + 2)
        wait_until(
            lambda t=threshold: len(history_keys(conn)) >= t, 60, 0.02, f"{threshold} completions"
        )
        victim = live[kill % len(live)]
        victim.kill()
        time.sleep(0.2)
        held += len(in_flight(conn, victim.name))
        live.remove(victim)
        live.append(start(f"fx-r{kill}"))

    drain_then_stop(conn, FLOW, live, 90)

    assert held > 0, "no kill landed while a victim held records"
    completed = history_keys(conn)
    effects = effect_counts(conn, "effects", "k")
    everything = {str(k) for k in range(records)}
    assert sorted(completed) == sorted(everything)
    # An effect if and only if a completion, never two.
    assert set(effects) == set(completed)
    assert {n for n in effects.values()} == {1}
    assert sum(effects.values()) == records


def test_shipped_record_effect_example(fleet: Fleet, dsn: str, conn: psycopg.Connection) -> None:
    """flowfleet.examples:record_effect, run by a worker that exits once the queue empties."""
    conn.execute("CREATE TABLE example_effects (record_key text NOT NULL)")
    queue.enqueue(conn, FLOW, [{"n": n} for n in range(120)])
    worker = fleet.start(
        FLOW,
        "flowfleet.examples:record_effect",
        dsn,
        args=["--batch-size", "25", "--exit-when-empty", "--poll-seconds", "0.2"],
    )
    assert worker.wait_exit(30) == 0, worker.stderr()
    assert queue_counts(conn, FLOW) == {
        "pending": 0,
        "processing": 0,
        "failed": 0,
        "completed": 120,
    }
    effects = effect_counts(conn, "example_effects", "record_key")
    assert effects == {str(n): 1 for n in range(120)}
